"""Cross-fitting: exact folds of the labeled images only, fold teachers that never see their
own fold, real pairs that are true matches, reuse of finished folds, and
``train-polisher --noise-model crossfit`` end to end."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from torchvision.ops import box_iou
from typer.testing import CliRunner

from dpl_tools.cli.cli import app
from dpl_tools.config import load_config
from dpl_tools.data.coco import read_json
from dpl_tools.data.crossfit_detections import read_crossfit, read_crossfit_detections
from dpl_tools.data.polisher_pairs import (
    REAL,
    GroundTruth,
    RealPairRules,
    mixed_rows,
    real_pairs,
)
from dpl_tools.data.synthetic import make_synthetic_dataset
from dpl_tools.engine.crossfit import crossfit_folds, fold_recipe
from dpl_tools.errors import DplError
from dpl_tools.models.checkpoint import DetectorSpec, read_checkpoint, save_detector
from dpl_tools.models.detector import build_detector

FAST_MODEL = {
    "arch": "mobilenet_v2_fpn",
    "min_size": 64,
    "max_size": 96,
    "detector_kwargs": {"rpn_pre_nms_top_n_test": 60, "rpn_post_nms_top_n_test": 30},
}


def _text(result) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def test_folds_partition_exactly_are_seeded_and_need_enough_images():
    ids = [5, 3, 11, 8, 2, 9, 14, 1, 7, 20]
    folds = crossfit_folds(ids, 3, seed=0)
    flat = [i for f in folds for i in f]
    assert sorted(flat) == sorted(ids) and len(flat) == len(set(flat))  # exact partition
    assert sorted(len(f) for f in folds) == [3, 3, 4]
    assert crossfit_folds(list(reversed(ids)), 3, seed=0) == folds  # order-free, seeded
    assert crossfit_folds(ids, 3, seed=1) != folds
    with pytest.raises(DplError, match="fewer than the 3 folds"):
        crossfit_folds([1, 2], 3, seed=0)


def test_fold_recipe_scales_iterations_and_keeps_the_rest():
    config = load_config()
    recipe = fold_recipe(config, 0.5)
    assert recipe["teacher"]["iters"] == config["teacher"]["iters"] // 2
    assert recipe["teacher"]["warmup_iters"] == config["teacher"]["warmup_iters"] // 2
    assert recipe["teacher"]["lr"] == config["teacher"]["lr"] and recipe["model"] == config["model"]


def test_real_pairs_are_true_matches_with_the_truth_class():
    gt = GroundTruth(
        np.array([1, 2], np.int64),
        np.array([0, 2, 3], np.int64),
        np.array([[0, 0, 40, 40], [50, 50, 90, 90], [10, 10, 30, 30]], np.float32),
        np.array([1, 2, 1], np.int32),
    )
    dets = [
        # image 1: a near-perfect box on GT 0, a shifted one on GT 1 (IoU 0.68), a false
        # positive, a low-score box on GT 0, a box below min_score
        (
            1,
            np.array(
                [
                    [1, 1, 40, 41],
                    [54, 54, 94, 94],
                    [100, 0, 120, 20],
                    [0, 0, 39, 39],
                    [0, 0, 40, 40],
                ],
                np.float32,
            ),  # fmt: skip
            np.array([0.9, 0.8, 0.95, 0.2, 0.01], np.float32),
        ),
        (3, np.array([[0, 0, 10, 10]], np.float32), np.array([0.99], np.float32)),  # no GT
    ]
    rules = RealPairRules(match_iou=0.5, initial_thresh=0.5, min_score=0.05, fg_iou=0.7)
    table = real_pairs(gt, dets, rules, round_=2)
    assert set(table["source"].to_pylist()) == {REAL} and set(table["round"].to_pylist()) == {2}
    kinds = np.array(table["kind"].to_pylist())
    boxes = np.stack([table[c].to_numpy() for c in ("x1", "y1", "x2", "y2")], 1)
    targets = np.stack([table[f"target_{c}"].to_numpy() for c in ("x1", "y1", "x2", "y2")], 1)
    iou = box_iou(torch.from_numpy(boxes), torch.from_numpy(targets)).diagonal().numpy()
    reg = kinds == "reg"
    # regression: the two confident matched detections only, each with its best GT
    assert reg.sum() == 2 and (iou[reg] >= 0.5).all()
    np.testing.assert_allclose(table["iou"].to_numpy()[reg], iou[reg], atol=1e-6)
    np.testing.assert_array_equal(targets[reg], gt.boxes[:2])
    # classification: every detection with score >= 0.05; the truth's class at IoU >= 0.7
    cls = ~reg
    labels = table["label"].to_numpy()[cls]
    ids = table["image_id"].to_numpy()[cls]
    assert cls.sum() == 5 and ids.tolist() == [1, 1, 1, 1, 3]
    assert labels.tolist() == [1, 0, 0, 1, 0]  # IoU-0.68 box and false positives: background


def test_mixed_rows_give_the_real_share():
    rng = np.random.default_rng(0)
    is_real = np.array([False] * 90 + [True] * 3)
    for fraction in (0.25, 0.5, 0.8):
        rows = mixed_rows(is_real, fraction, rng)
        share = is_real[rows].mean()
        assert abs(share - fraction) < 0.01, (fraction, share)
        assert (~is_real[rows]).sum() == 90  # every synthetic row once
    assert not is_real[mixed_rows(is_real, 0.0, rng)].any()
    assert is_real[mixed_rows(is_real, 1.0, rng)].all()
    assert len(mixed_rows(np.zeros(5, bool), 0.5, rng)) == 5


@pytest.fixture(scope="module")
def crossfit_data(module_dir):
    """9 labeled + 3 test images (80x64), a teacher checkpoint whose recorded recipe trains
    fold teachers in 1 iteration, and a config that makes real pairs of weak detections."""
    root = module_dir("crossfit")
    ann = make_synthetic_dataset(root, num_images=12, image_size=(80, 64), max_objects=2, seed=3)
    raw = read_json(ann)
    labeled_ids = {r["id"] for r in raw["images"][:9]}

    def subset(ids: set[int], name: str):
        out = {**raw, "images": [r for r in raw["images"] if r["id"] in ids]}
        out["annotations"] = [a for a in raw["annotations"] if a["image_id"] in ids]
        (root / name).write_text(json.dumps(out))
        return root / name

    test_ids = {r["id"] for r in raw["images"]} - labeled_ids
    labeled, test = subset(labeled_ids, "labeled.json"), subset(test_ids, "test.json")
    recipe = {"iters": 2, "batch_size": 2, "workers": 0, "multiscale": None,
              "checkpoint_every": 0, "warmup_iters": 2}  # fmt: skip
    config = load_config(None, {"model": FAST_MODEL}, {"teacher": recipe})  # null: a value
    torch.manual_seed(0)
    model = build_detector("mobilenet_v2_fpn", 3, "none", min_size=64, max_size=96,
                           **FAST_MODEL["detector_kwargs"])  # fmt: skip
    teacher = root / "teacher.pt"
    spec = DetectorSpec("mobilenet_v2_fpn", raw["categories"], 64, 96, extra={"config": config})
    save_detector(teacher, model, spec)
    cfg_file = root / "config.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "polisher": {"rounds": 1, "reg_copies": 6, "cls_copies": [3, 3],
                     "empirical_min_match_iou": 0.05, "crossfit_folds": 3, "workers": 0,
                     "real_fraction": 0.4},
        "polish": {"initial_thresh": 0.0},
    }))  # fmt: skip
    return {
        "root": root, "labeled": labeled, "test": test, "teacher": teacher,
        "images": root / "images", "config": cfg_file, "labeled_ids": labeled_ids,
        "test_ids": test_ids,
    }  # fmt: skip


def test_train_polisher_crossfit_end_to_end_and_reuse(crossfit_data, tmp_path):
    d = crossfit_data
    noise, out = tmp_path / "noise.parquet", tmp_path / "polisher.pt"
    common = ["--teacher", str(d["teacher"]), "--ann", str(d["labeled"]), "--images",
              str(d["images"]), "--config", str(d["config"]), "--device", "cpu"]  # fmt: skip
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["train-polisher", *common, "--noise", str(noise), "--out", str(out), "--noise-model",
         "crossfit", "--iters", "1", "--batch-size", "1", "--val-fraction", "0",
         "--reg-per-image", "16", "--cls-per-image", "16", "--max-proposals", "10"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "crossfit: 3 fold teachers x 1 iterations = 1.50x the teacher's 2" in _text(result)

    # the folds partition exactly the labeled images, never a test image
    crossfit = tmp_path / "crossfit.parquet"
    table, meta = read_crossfit(crossfit)
    folds = meta["fold_images"]
    flat = [i for f in folds for i in f]
    assert sorted(flat) == sorted(d["labeled_ids"]) and len(flat) == len(set(flat))
    assert not set(flat) & d["test_ids"] and not set(table["image_id"].to_pylist()) & d["test_ids"]
    assert meta["folds"] == 3 and meta["iterations"] == 1 and meta["seed"] == 0
    assert len(meta["teacher_config_sha256"]) == 64
    for image_id, fold in zip(table["image_id"].to_pylist(), table["fold"].to_pylist(),
                              strict=True):  # fmt: skip
        assert image_id in folds[fold]  # each detection comes from its image's own fold
    seen = read_crossfit_detections(crossfit)  # the keep-threshold fit's reader accepts it
    assert {h.image_id for h in seen.values()} == d["labeled_ids"]

    # a fold teacher never sees its own fold: it trained on exactly the other folds
    for k, held_out in enumerate(folds):
        fold_ann = tmp_path / "crossfit" / f"fold-{k}.json"
        trained_on = {r["id"] for r in read_json(fold_ann)["images"]}
        assert trained_on == d["labeled_ids"] - set(held_out)
        ckpt = read_checkpoint(tmp_path / "crossfit" / f"fold-{k}.pt")
        assert ckpt["spec"]["extra"]["train_ann"] == str(fold_ann)
        assert ckpt["spec"]["extra"]["config"]["teacher"]["iters"] == 1

    # real pairs: true matches (IoU >= the configured match IoU) beside the synthetic ones
    pairs = pq.read_table(noise)
    real = pairs.filter(pc.equal(pairs["source"], "real"))
    assert real.num_rows > 0 and pairs.num_rows > real.num_rows
    reg = real.filter(pc.equal(real["kind"], "reg"))
    assert reg.num_rows > 0
    b = torch.from_numpy(np.stack([reg[c].to_numpy() for c in ("x1", "y1", "x2", "y2")], 1))
    t = torch.from_numpy(np.stack([reg[f"target_{c}"].to_numpy() for c in ("x1", "y1", "x2",
                                                                           "y2")], 1))  # fmt: skip
    assert (box_iou(b, t).diagonal() >= 0.05 - 1e-6).all()

    # the polisher records which noise it learned from
    extra = torch.load(out, weights_only=True)["extra"]
    assert extra["noise"]["model"] == "crossfit" and extra["noise"]["folds"] == 3
    assert extra["noise"]["real_fraction"] == 0.4

    # rerun: finished folds are reused; a missing one alone is retrained
    stamps = {k: (tmp_path / "crossfit" / f"fold-{k}.pt").stat().st_mtime_ns for k in range(3)}
    synth = ["synth-noise", *common, "--out", str(noise), "--noise-model", "crossfit"]
    result = runner.invoke(app, synth)
    assert result.exit_code == 0, result.output
    assert "(0 trained in 0.0 s, 3 reused)" in _text(result)
    (tmp_path / "crossfit" / "fold-1.pt").unlink()
    result = runner.invoke(app, synth)
    assert result.exit_code == 0, result.output
    assert "(1 trained in" in _text(result) and "2 reused)" in _text(result)
    after = {k: (tmp_path / "crossfit" / f"fold-{k}.pt").stat().st_mtime_ns for k in range(3)}
    assert after[0] == stamps[0] and after[2] == stamps[2] and after[1] != stamps[1]
    assert read_crossfit(crossfit)[1]["fold_images"] == folds


def test_crossfit_refuses_a_heldout_ann(crossfit_data, tmp_path):
    d = crossfit_data
    result = CliRunner().invoke(
        app,
        ["synth-noise", "--ann", str(d["labeled"]), "--teacher", str(d["teacher"]), "--images",
         str(d["images"]), "--out", str(tmp_path / "n.parquet"), "--noise-model", "crossfit",
         "--heldout-ann", str(d["test"])],
    )  # fmt: skip
    assert isinstance(result.exception, DplError)
    assert "crossfit needs none" in str(result.exception)
    assert not (tmp_path / "n.parquet").exists() and not (tmp_path / "crossfit").exists()
