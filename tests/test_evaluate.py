"""COCO metrics against independently computed values, and `dpl evaluate` end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dpl_tools.data.coco import load_coco
from dpl_tools.evaluation.coco_eval import METRICS, coco_metrics
from dpl_tools.models.checkpoint import DetectorSpec, save_detector
from dpl_tools.models.detector import build_detector

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]

# Two images; boxes 40x40 (medium, area 1600) and 20x20 (small).
GT = {
    "images": [
        {"id": 1, "file_name": "a.png", "width": 200, "height": 200},
        {"id": 2, "file_name": "b.png", "width": 200, "height": 200},
    ],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 40, 40], "area": 1600},
        {"id": 2, "image_id": 1, "category_id": 9, "bbox": [100, 100, 20, 20], "area": 400},
        {"id": 3, "image_id": 2, "category_id": 5, "bbox": [50, 60, 40, 40], "area": 1600},
    ],
    "categories": [{"id": 5, "name": "cell"}, {"id": 9, "name": "dot"}],
}


def _dets(shift_fraction: float = 0.0, category=None) -> list[dict]:
    out = []
    for a in GT["annotations"]:
        x, y, w, h = a["bbox"]
        out.append(
            {
                "image_id": a["image_id"],
                "category_id": category or a["category_id"],
                "bbox": [x + shift_fraction * w, y, w, h],
                "score": 0.9,
            }
        )
    return out


def test_perfect_predictions_give_ap_1():
    m = coco_metrics(GT, _dets())
    assert set(m) == set(METRICS)
    assert m["AP"] == m["AP50"] == m["AP75"] == m["APs"] == m["APm"] == pytest.approx(1.0)
    assert m["APl"] == -1.0  # no large box in the ground truth


def test_shifted_predictions_score_by_iou_threshold():
    # Shift by w/5: IoU = (w - w/5) / (w + w/5) = 2/3, which passes the IoU thresholds
    # 0.50, 0.55, 0.60, 0.65 and fails 0.70 ... 0.95: AP = 4/10, AP50 = 1, AP75 = 0.
    m = coco_metrics(GT, _dets(0.2))
    assert m["AP"] == pytest.approx(0.4, abs=1e-3)
    assert m["AP50"] == pytest.approx(1.0)
    assert m["AP75"] == 0.0


def test_wrong_class_and_no_predictions_give_zero(synth_dataset):
    assert coco_metrics(GT, _dets(category=9))["AP50"] < 1.0
    assert coco_metrics(GT, [])["AP"] == 0.0
    # CocoData ground truth works the same as a dict.
    coco = load_coco(synth_dataset)
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1}
        for a in coco.annotations
    ]
    assert coco_metrics(coco, dets)["AP"] == pytest.approx(1.0)


def _dpl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dpl_tools.cli", *args], cwd=ROOT, capture_output=True, text=True
    )


def test_evaluate_cli_on_a_checkpoint(synth_dataset, tmp_path):
    coco = load_coco(synth_dataset)
    torch.manual_seed(0)
    model = build_detector("mobilenet_v2_fpn", len(coco.categories), min_size=64, max_size=96)
    spec = DetectorSpec("mobilenet_v2_fpn", coco.categories, 64, 96)
    ckpt = save_detector(tmp_path / "m.pt", model, spec)
    ann = tmp_path / "gt.json"  # a 4-image ground truth
    keep = {im["id"] for im in coco.images[:4]}
    gt = coco.to_dict()
    gt["images"] = [im for im in gt["images"] if im["id"] in keep]
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in keep]
    ann.write_text(json.dumps(gt))
    images = synth_dataset.parent / "images"
    metrics, preds = tmp_path / "metrics.json", tmp_path / "preds.json"
    proc = _dpl(
        "evaluate", "--model", str(ckpt), "--ann", str(ann), "--images", str(images),
        "--batch-size", "3", "--workers", "0", "--device", "cpu",
        "--json", str(metrics), "--predictions", str(preds),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "AP50" in proc.stdout
    saved = json.loads(metrics.read_text())
    assert set(METRICS) <= set(saved) and saved["images"] == 4
    detections = json.loads(preds.read_text())
    assert detections and {d["image_id"] for d in detections} <= keep
    assert {d["category_id"] for d in detections} <= {c["id"] for c in coco.categories}
    assert max(sum(d["image_id"] == i for d in detections) for i in keep) <= 100
    # The saved metrics are exactly those of the saved predictions.
    assert coco_metrics(gt, detections)["AP"] == pytest.approx(saved["AP"], abs=1e-6)

    bad = tmp_path / "bad.pt"
    bad.write_text("nope")
    proc = _dpl("evaluate", "--model", str(bad), "--ann", str(ann), "--images", str(images))
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "bad.pt" in proc.stderr and "Traceback" not in proc.stderr
