"""``train-polisher --detections`` / ``synth-noise --detections``: the polishers learn another
labeler's mistakes from its boxes on the labeled images (real pairs matched to the ground
truth, background for its false positives, the true class for its confusions), and the
keep thresholds are fitted on those same boxes."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

from dpl_tools.cli.cli import app
from dpl_tools.config import load_config
from dpl_tools.data.coco import read_json
from dpl_tools.data.crossfit_detections import LABELER_FILE, read_crossfit_detections
from dpl_tools.data.pseudo_labels import META_BOXES, read_pseudo_labels
from dpl_tools.data.synthetic import make_synthetic_dataset
from dpl_tools.errors import DplError
from dpl_tools.io import sha256_file
from dpl_tools.models.checkpoint import DetectorSpec, save_detector
from dpl_tools.models.detector import build_detector

FAST_MODEL = {
    "arch": "mobilenet_v2_fpn",
    "min_size": 64,
    "max_size": 96,
    "detector_kwargs": {"rpn_pre_nms_top_n_test": 60, "rpn_post_nms_top_n_test": 30},
}
SHIFT = 1.0  # px: the labeler's boxes sit this far right of the truth


def _text(result) -> str:
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def labeler_data(module_dir):
    """8 labeled images (80x64, 3 classes), a random teacher, and a labeler's COCO results
    on them: every GT box shifted by SHIFT px with its true class, except the first box of
    the first image, given the wrong class, plus one false positive per image."""
    root = module_dir("labeler")
    ann = make_synthetic_dataset(root, num_images=8, image_size=(80, 64), max_objects=2, seed=5)
    raw = read_json(ann)
    cats = [c["id"] for c in raw["categories"]]
    results, truth = [], {}
    for k, a in enumerate(raw["annotations"]):
        x, y, w, h = a["bbox"]
        wrong = k == 0
        cat = cats[(cats.index(a["category_id"]) + 1) % len(cats)] if wrong else a["category_id"]
        results.append({"image_id": a["image_id"], "category_id": cat,
                        "bbox": [x + SHIFT, y, w, h], "score": 0.8})  # fmt: skip
        truth[(a["image_id"], round(x + SHIFT, 2))] = (a["category_id"], [x, y, x + w, y + h])
    false_positives = 0
    for r in raw["images"]:
        results.append({"image_id": r["id"], "category_id": cats[0], "bbox": [1, 1, 6, 6],
                        "score": 0.6})  # fmt: skip
        false_positives += 1
    preds = root / "labeler_preds.json"
    preds.write_text(json.dumps(results))
    torch.manual_seed(0)
    config = load_config(overrides={"model": FAST_MODEL})
    model = build_detector("mobilenet_v2_fpn", 3, "none", min_size=64, max_size=96,
                           **FAST_MODEL["detector_kwargs"])  # fmt: skip
    teacher = root / "teacher.pt"
    save_detector(teacher, model, DetectorSpec("mobilenet_v2_fpn", raw["categories"], 64, 96,
                                               extra={"config": config}))  # fmt: skip
    cfg_file = root / "config.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "polisher": {"rounds": 1, "reg_copies": 4, "cls_copies": [2, 2], "workers": 0,
                     "empirical_min_match_iou": 0.3, "real_fraction": 0.5},
        "polish": {"initial_thresh": 0.5},
    }))  # fmt: skip
    return {"root": root, "ann": ann, "raw": raw, "preds": preds, "teacher": teacher,
            "config": cfg_file, "truth": truth, "boxes": len(raw["annotations"]),
            "false_positives": false_positives}  # fmt: skip


def test_train_polisher_learns_the_labelers_mistakes(labeler_data, tmp_path):
    d = labeler_data
    noise, out = tmp_path / "noise.parquet", tmp_path / "polisher.pt"
    result = CliRunner().invoke(
        app,
        ["train-polisher", "--teacher", str(d["teacher"]), "--ann", str(d["ann"]), "--images",
         str(d["root"] / "images"), "--config", str(d["config"]), "--device", "cpu",
         "--noise", str(noise), "--out", str(out), "--detections", str(d["preds"]),
         "--iters", "1", "--batch-size", "1", "--val-fraction", "0", "--reg-per-image", "8",
         "--cls-per-image", "8", "--max-proposals", "4"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    total = d["boxes"] + d["false_positives"]
    assert f"--detections: {total} boxes on 8 of 8 labeled images" in _text(result)

    # the labeler's boxes, in the crossfit schema, for the keep-threshold fit
    written = read_crossfit_detections(tmp_path / LABELER_FILE)
    assert {h.image_id for h in written.values()} == {r["id"] for r in d["raw"]["images"]}
    assert sum(len(h.scores) for h in written.values()) == total

    pairs = pq.read_table(noise)
    real = pairs.filter(pc.equal(pairs["source"], "real"))
    reg = real.filter(pc.equal(real["kind"], "reg")).to_pylist()
    cls = real.filter(pc.equal(real["kind"], "cls")).to_pylist()
    # regression: every shifted box (score 0.8 >= initial 0.5) targets the box it came from;
    # the false positives (IoU 0 with any truth) are no regression pair
    assert len(reg) == d["boxes"]
    for row in reg:
        cat, target = d["truth"][(row["image_id"], round(row["x1"], 2))]
        assert [row[f"target_{c}"] for c in ("x1", "y1", "x2", "y2")] == pytest.approx(target)
    # classification: the true class at IoU >= fg_iou (the mislabeled box too), background
    # for the rest and for every false positive
    fg_iou = load_config()["polisher"]["fg_iou"]
    cat_to_label = {c["id"]: k + 1 for k, c in enumerate(d["raw"]["categories"])}
    assert len(cls) == total
    for row in cls:
        key = (row["image_id"], round(row["x1"], 2))
        if key not in d["truth"]:
            assert row["label"] == 0 and row["iou"] < fg_iou  # a false positive
            continue
        cat, _ = d["truth"][key]
        assert row["label"] == (cat_to_label[cat] if row["iou"] >= fg_iou else 0)
    first = d["raw"]["annotations"][0]  # the box the labeler gave the wrong class
    row = next(r for r in cls if (r["image_id"], round(r["x1"], 2))
               == (first["image_id"], round(first["bbox"][0] + SHIFT, 2)))  # fmt: skip
    assert row["iou"] >= fg_iou and row["label"] == cat_to_label[first["category_id"]]

    ckpt = torch.load(out, weights_only=True)
    noise_meta = ckpt["extra"]["noise"]
    assert noise_meta["model"] == "detections" and noise_meta["real_fraction"] == 0.5
    assert noise_meta["labeler"]["sha256"] == sha256_file(d["preds"])
    assert noise_meta["real_pairs"] == {"reg": d["boxes"], "cls": total}
    fitted = ckpt["extra"]["keep_thresholds"]
    assert fitted is not None and fitted["crossfit"] == str(tmp_path / LABELER_FILE)
    assert fitted["detections"] == total  # every box >= the initial threshold 0.5

    # dpl polish --detections with it: the fitted thresholds, no teacher-mistakes note
    labels = tmp_path / "labels.parquet"
    result = CliRunner().invoke(
        app,
        ["polish", "--images", str(d["ann"]), "--image-root", str(d["root"] / "images"),
         "--teacher", str(d["teacher"]),
         "--polisher", str(out), "--out", str(labels), "--detections", str(d["preds"]),
         "--config", str(d["config"]), "--device", "cpu", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "learned the teacher's mistakes" not in _text(result)
    meta = read_pseudo_labels(labels)[1]
    assert meta[META_BOXES]["sha256"] == sha256_file(d["preds"])


def test_synth_noise_detections_from_a_yolo_folder(labeler_data, tmp_path):
    """The YOLO txt form (normalised cx cy w h conf) gives the same real pairs in pixels."""
    d = labeler_data
    folder = tmp_path / "yolo"
    folder.mkdir()
    images = {r["id"]: r for r in d["raw"]["images"]}
    lines: dict[str, list[str]] = {}
    cat_index = {c["id"]: k for k, c in enumerate(d["raw"]["categories"])}
    for a in d["raw"]["annotations"]:
        r = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        W, H = r["width"], r["height"]
        lines.setdefault(r["file_name"], []).append(
            f"{cat_index[a['category_id']]} {(x + w / 2) / W} {(y + h / 2) / H} {w / W} {h / H} 0.9"
        )
    for name, rows in lines.items():
        (folder / name).with_suffix(".txt").parent.mkdir(parents=True, exist_ok=True)
        (folder / name).with_suffix(".txt").write_text("\n".join(rows) + "\n")
    noise = tmp_path / "noise.parquet"
    result = CliRunner().invoke(
        app,
        ["synth-noise", "--ann", str(d["ann"]), "--out", str(noise), "--config",
         str(d["config"]), "--detections", str(folder)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    pairs = pq.read_table(noise)
    reg = pairs.filter(pc.and_(pc.equal(pairs["source"], "real"), pc.equal(pairs["kind"], "reg")))
    assert reg.num_rows == d["boxes"]
    box = np.stack([reg[c].to_numpy() for c in ("x1", "y1", "x2", "y2")], 1)
    target = np.stack([reg[f"target_{c}"].to_numpy() for c in ("x1", "y1", "x2", "y2")], 1)
    np.testing.assert_allclose(box, target, atol=1e-3)  # exact boxes, in pixels
    assert "noise model detections" in _text(result)


def test_labeler_detections_must_cover_the_labeled_images(labeler_data, tmp_path):
    d = labeler_data
    noise = tmp_path / "noise.parquet"
    for name, records, problem in (
        ("none.json", [], "no detection on any of the 8 labeled images"),
        ("elsewhere.json", [{"file_name": "not_labeled.jpg", "category_id": 1,
                             "bbox": [1, 1, 9, 9], "score": 0.9}],
         "unknown image (file_name 'not_labeled.jpg' is not among the --ann images)"),
    ):  # fmt: skip
        other = tmp_path / name
        other.write_text(json.dumps(records))
        result = CliRunner().invoke(
            app, ["synth-noise", "--ann", str(d["ann"]), "--out", str(noise), "--detections",
                  str(other)],
        )  # fmt: skip
        assert isinstance(result.exception, DplError), result.output
        assert str(result.exception).startswith(f"{other}:") and problem in str(result.exception)
        assert not noise.exists() and not (tmp_path / LABELER_FILE).exists()


def test_labeler_class_names_must_match(labeler_data, tmp_path):
    d = labeler_data
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\nmoose\n")
    noise = tmp_path / "noise.parquet"
    result = CliRunner().invoke(
        app, ["synth-noise", "--ann", str(d["ann"]), "--out", str(noise), "--detections",
              str(d["preds"]), "--detection-classes", str(classes)],
    )  # fmt: skip
    assert isinstance(result.exception, DplError), result.output
    message = str(result.exception)
    assert str(d["preds"]) in message and "cat" in message and "moose" in message
    assert not noise.exists()
