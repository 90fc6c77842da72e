"""COCO detection metrics (pycocotools, its printing silenced)."""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dpl_tools.data.coco import CocoData

# The first six numbers of COCOeval.stats, in order.
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_metrics(gt: dict | CocoData, detections: list[dict[str, Any]]) -> dict[str, float]:
    """AP (IoU .50:.95), AP50, AP75 and AP small/medium/large of COCO-format detections
    against ground truth. A value is -1.0 where the ground truth has no box of that size."""
    return coco_evaluation(gt, detections)[0]


def coco_evaluation(
    gt: dict | CocoData, detections: list[dict[str, Any]]
) -> tuple[dict[str, float], dict[int, float]]:
    """``coco_metrics`` and the AP (IoU .50:.95, all sizes, 100 detections) of each
    category id of the ground truth (-1.0 for a category without a true box)."""
    gt_dict = gt.to_dict() if isinstance(gt, CocoData) else gt
    gt_dict = copy.deepcopy(gt_dict)
    gt_dict.setdefault("info", {})
    for ann in gt_dict.get("annotations", []):
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
    cat_ids = [int(c["id"]) for c in gt_dict.get("categories", [])]
    with_boxes = {int(a["category_id"]) for a in gt_dict.get("annotations", [])}
    if not gt_dict.get("annotations"):
        return {name: -1.0 for name in METRICS}, {c: -1.0 for c in cat_ids}
    if not detections:
        zero = {c: 0.0 if c in with_boxes else -1.0 for c in cat_ids}
        return {name: 0.0 for name in METRICS}, zero
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_dict
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(detections))
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {
        name: float(np.round(v, 6)) for name, v in zip(METRICS, evaluator.stats[:6], strict=True)
    }
    # precision[T, R, K, A, M]: IoU thresholds, recall points, categories, area "all" = 0,
    # max detections 100 = last; -1 marks a category without a true box
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    per_class = {}
    for k, cat in enumerate(evaluator.params.catIds):
        p = precision[:, :, k]
        per_class[int(cat)] = float(np.round(p[p > -1].mean(), 6)) if (p > -1).any() else -1.0
    return metrics, per_class
