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
    gt_dict = gt.to_dict() if isinstance(gt, CocoData) else gt
    gt_dict = copy.deepcopy(gt_dict)
    gt_dict.setdefault("info", {})
    for ann in gt_dict.get("annotations", []):
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
    if not gt_dict.get("annotations"):
        return {name: -1.0 for name in METRICS}
    if not detections:
        return {name: 0.0 for name in METRICS}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_dict
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(detections))
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {
        name: float(np.round(v, 6)) for name, v in zip(METRICS, evaluator.stats[:6], strict=True)
    }
