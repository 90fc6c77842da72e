"""A weak teacher on a tiny labeled set (issue 26): the fold teachers find almost nothing,
so the keep rule cannot be fitted. The fit says so and falls back (recorded in the
checkpoint and the Parquet metadata), some classification pseudo labels are kept, a rule
that keeps nothing is warned about by polish and refused by train-student; the regression
polisher is checked on real held-out pairs and falls back to the teacher's boxes when it
makes them worse."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
import yaml
from typer.testing import CliRunner

from dpl_tools.cli.cli import app
from dpl_tools.config import load_config
from dpl_tools.data.coco import read_json
from dpl_tools.data.pseudo_labels import META_FITTED, META_THRESHOLDS, read_pseudo_labels
from dpl_tools.data.synthetic import make_synthetic_dataset
from dpl_tools.engine.crossfit import fold_fraction
from dpl_tools.engine.fit_thresholds import HeldOutImage
from dpl_tools.engine.keep_thresholds import matched_density_floor
from dpl_tools.engine.polish import PolishSettings, polish_boxes
from dpl_tools.engine.regression_check import check_regression, resolve_reg_steps
from dpl_tools.errors import DplError
from dpl_tools.models.checkpoint import DetectorSpec, save_detector
from dpl_tools.models.detector import build_detector
from dpl_tools.models.polisher import Polisher

KWARGS = {"rpn_pre_nms_top_n_test": 60, "rpn_post_nms_top_n_test": 30}
MODEL = {"arch": "mobilenet_v2_fpn", "min_size": 64, "max_size": 96, "detector_kwargs": KWARGS}


def _text(result) -> str:
    return " ".join(result.output.split())


def _invoke(*args) -> object:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture(scope="module")
def weak(module_dir) -> dict:
    """9 labeled and 3 unlabeled tiny images, an untrained teacher (its recipe: 2
    iterations), and a polisher trained with --noise-model crossfit on 1-iteration folds."""
    root = module_dir("weak")
    ann = make_synthetic_dataset(root, num_images=12, image_size=(80, 64), max_objects=2, seed=5)
    raw = read_json(ann)
    labeled_ids = {r["id"] for r in raw["images"][:9]}

    def subset(ids: set[int], name: str):
        out = {**raw, "images": [r for r in raw["images"] if r["id"] in ids]}
        out["annotations"] = [a for a in raw["annotations"] if a["image_id"] in ids]
        (root / name).write_text(json.dumps(out))
        return root / name

    labeled = subset(labeled_ids, "labeled.json")
    unlabeled = subset({r["id"] for r in raw["images"]} - labeled_ids, "unlabeled.json")
    recipe = {"iters": 2, "batch_size": 2, "workers": 0, "multiscale": None,
              "checkpoint_every": 0, "warmup_iters": 2}  # fmt: skip
    config = load_config(None, {"model": MODEL}, {"teacher": recipe})  # null: a value
    torch.manual_seed(0)
    model = build_detector("mobilenet_v2_fpn", 3, "none", min_size=64, max_size=96, **KWARGS)
    teacher = root / "teacher.pt"
    save_detector(teacher, model, DetectorSpec("mobilenet_v2_fpn", raw["categories"], 64, 96,
                                               extra={"config": config}))  # fmt: skip
    cfg = root / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": MODEL,
        "polisher": {"rounds": 1, "reg_copies": 6, "cls_copies": [3, 3], "workers": 0},
        "polish": {"initial_thresh": 0.0, "detections_per_img": 5, "workers": 0},
        "student": {"warmup_iters": 1, "workers": 0, "multiscale": None},
    }))  # fmt: skip
    common = ["--teacher", teacher, "--ann", labeled, "--images", root / "images",
              "--config", cfg, "--device", "cpu"]  # fmt: skip
    polisher = root / "polisher.pt"
    result = _invoke(
        "train-polisher", *common, "--noise", root / "noise.parquet", "--out", polisher,
        "--noise-model", "crossfit", "--crossfit-iters-fraction", "0.5", "--iters", "1",
        "--batch-size", "1", "--reg-per-image", "16", "--cls-per-image", "16",
        "--max-proposals", "10", "--val-fraction", "0.34",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return {"root": root, "teacher": teacher, "polisher": polisher, "labeled": labeled,
            "unlabeled": unlabeled, "images": root / "images", "config": cfg,
            "train_output": _text(result)}  # fmt: skip


def _polish(weak: dict, out, *extra) -> object:
    return _invoke(
        "polish", "--images", weak["unlabeled"], "--image-root", weak["images"], "--teacher",
        weak["teacher"], "--polisher", weak["polisher"], "--out", out, "--config",
        weak["config"], "--device", "cpu", "--no-progress", *extra,
    )  # fmt: skip


def test_a_fit_with_nothing_to_fit_on_falls_back_loudly_and_keeps_boxes(weak, tmp_path):
    text = weak["train_output"]
    # the fitting table says what it fitted on, and the fallback is one loud line
    assert "fitted on cross-fitted boxes" in text and " matched to" in text
    assert "boxes per image" in text and "fold teachers" in text
    assert "keep rule: too little to fit on, fallback keep_all (" in text
    record = torch.load(weak["polisher"], weights_only=True)["extra"]["keep_thresholds"]
    assert record["keep_rule_source"].startswith("fallback keep_all (")
    assert (record["cls_prob"], record["teacher_score"]) == (1.0, 0.0)
    assert record["matched"] < 30 and record["density"]["images"] == 9

    out = tmp_path / "labels.parquet"
    result = _polish(weak, out)
    assert result.exit_code == 0, result.output
    assert "keep rule: fallback keep_all (" in _text(result)
    table, meta = read_pseudo_labels(out)
    thresholds = meta[META_THRESHOLDS]
    assert thresholds["keep_rule_source"] == record["keep_rule_source"]
    assert thresholds["cls_prob_source"] == "fallback"
    assert meta[META_FITTED] == record
    boxes = table.filter(pc.is_valid(table["teacher_score"]))
    kept = pc.sum(boxes["use_cls"]).as_py()
    assert boxes.num_rows > 0 and kept == boxes.num_rows  # every box, the teacher's label
    assert boxes["polished_label"].to_pylist() == boxes["teacher_label"].to_pylist()
    # the regression check could not tell on so few pairs, and says so
    check = torch.load(weak["polisher"], weights_only=True)["extra"]["regression_check"]
    assert check["validated"] is False and check["choice"] == "polisher"
    assert thresholds["reg_steps"] == 1 and "regression check" in thresholds["reg_steps_source"]


def test_a_rule_that_keeps_nothing_is_warned_about_and_refused(weak, tmp_path):
    out = tmp_path / "paper.parquet"
    result = _polish(weak, out, "--cls-prob", "1.0", "--teacher-score", "1.0")
    assert result.exit_code == 0, result.output
    assert "warning: the keep rule kept 0 of" in _text(result)
    student = ["train-student", "--ann", weak["labeled"], "--images", weak["images"],
               "--pseudo", out, "--init", weak["teacher"], "--config", weak["config"],
               "--device", "cpu", "--iters", "1", "--batch-size", "2",
               "--out", tmp_path / "student.pt"]  # fmt: skip
    refused = CliRunner().invoke(app, [str(a) for a in (*student, "--negatives", "ignore")])
    assert isinstance(refused.exception, DplError) and not (tmp_path / "student.pt").exists()
    message = str(refused.exception)
    assert "no classification pseudo label (use_cls)" in message and "--allow-empty" in message
    trained = _invoke(*student, "--negatives", "ignore", "--allow-empty")
    assert trained.exit_code == 0, trained.output and (tmp_path / "student.pt").exists()
    hard = _invoke(*student, "--negatives", "hard", "--out", tmp_path / "hard.pt")
    assert hard.exit_code == 0, hard.output  # hard negatives: the boxes teach background


def _held_out(before_shift: float, after_shift: float, n: int = 12) -> HeldOutImage:
    gt = np.array([[10.0 + 30 * i, 10, 30 + 30 * i, 30] for i in range(n)])
    boxes, polished = gt + before_shift, gt + after_shift
    labels = np.ones(n, np.int64)
    return HeldOutImage(boxes, labels, np.full(n, 0.8), labels, np.full(n, 0.9), gt, labels,
                        image_id=1, polished_boxes=polished)  # fmt: skip


def test_regression_check_falls_back_to_the_teachers_boxes_when_polishing_hurts():
    better = check_regression([_held_out(3.0, 1.0)])
    assert better["choice"] == "polisher" and better["reg_steps"] == 1 and better["validated"]
    assert better["mean_iou_after"] > better["mean_iou_before"]
    worse = check_regression([_held_out(1.0, 3.0)])
    assert worse["choice"] == "teacher boxes" and worse["reg_steps"] == 0
    assert worse["pairs"] == 12 and "made the real boxes worse" in worse["reason"]
    few = check_regression([_held_out(1.0, 3.0, n=4)])
    assert few["validated"] is False and few["reg_steps"] == 1
    assert resolve_reg_steps(None, worse)[0] == 0 and resolve_reg_steps(2, worse) == (2, "user")
    assert resolve_reg_steps(None, None)[0] == 1


def test_reg_steps_zero_keeps_the_teachers_boxes():
    torch.manual_seed(0)
    teacher = build_detector("mobilenet_v2_fpn", 3, "none", min_size=64, max_size=96, **KWARGS)
    polisher = Polisher.for_teacher(teacher, 3).eval()
    image = torch.rand(3, 64, 80)
    with torch.no_grad():
        batch, _ = teacher.eval().transform([image])
        features = teacher.backbone(batch.tensors)
        boxes = [torch.tensor([[5.0, 5.0, 30.0, 40.0], [40.0, 10.0, 70.0, 50.0]])]
        args = dict(features=features, boxes=boxes, scores=[torch.tensor([0.8, 0.6])],
                    labels=[torch.tensor([1, 2])], image_sizes=[tuple(batch.image_sizes[0])],
                    original_sizes=[(64, 80)], polisher=polisher)  # fmt: skip
        kept = polish_boxes(**args, settings=PolishSettings(reg_steps=0))[0]
        moved = polish_boxes(**args, settings=PolishSettings(reg_steps=1))[0]
    torch.testing.assert_close(kept["polished_boxes"], kept["boxes"])
    assert not torch.allclose(moved["polished_boxes"], moved["boxes"])
    torch.testing.assert_close(kept["probs"], moved["probs"])  # classification unchanged


def test_fold_teachers_match_the_teachers_iterations_per_image_and_density():
    assert fold_fraction(None, 3) == pytest.approx(2 / 3) and fold_fraction(0.5, 3) == 0.5
    gt = np.array([[0.0, 0, 10, 10]])
    one = np.ones(4, np.int64)
    weak_scores = np.array([0.6, 0.3, 0.2, 0.1])
    im = HeldOutImage(np.repeat(gt, 4, 0), one, weak_scores, one, np.full(4, 0.5), gt, one[:1],
                      teacher_detections=3)  # fmt: skip
    assert matched_density_floor([im], 0.5) == 0.2  # down to the teacher's 3 boxes per image
    im.teacher_detections = 1
    assert matched_density_floor([im], 0.5) == 0.5  # the fold teacher finds as many at 0.5
