"""What another keep-rule operating point would cost: the classification pseudo labels'
precision, recall and F1 (class-aware, IoU 0.5) on images with ground truth, as one
threshold of the rule moves while the other stays at the file's operating point.

The rule is the production one (``fit_thresholds.evaluate_rule`` over
``keep_rule.select_pseudo_labels``), applied again to the file's columns: the teacher's
boxes, labels and scores, and the polisher's class (``polisher_label``) and probability.
Files of earlier dpl versions have no ``polisher_label``; there the label as polished
stands in, so relabelling at other thresholds is not replayed (``exact`` is False).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from dpl_tools.data.coco import CocoData
from dpl_tools.data.pseudo_views import BOX_COORDS
from dpl_tools.engine.fit_thresholds import HeldOutImage, rule_point
from dpl_tools.evaluation.matching import box_iou_np
from dpl_tools.evaluation.pseudo_quality import Truth, gt_image_keys

# Thresholds the curves are drawn at (the operating point itself is added to each).
SWEEP_GRID = tuple(round(x, 3) for x in np.linspace(0.0, 1.0, 41))


def _numbers(table: pa.Table, name: str, dtype: Any, fill: Any) -> np.ndarray:
    return np.asarray(table[name].fill_null(fill).to_numpy(zero_copy_only=False), dtype=dtype)


def images_with_truth(table: pa.Table, gt: CocoData) -> tuple[list[HeldOutImage], bool]:
    """One ``HeldOutImage`` per processed image found in ``gt`` (teacher boxes with the
    polisher's verdict, and the image's truth), and whether the polisher's own classes
    were in the file (else the polished labels stand in)."""
    keys, _ = gt_image_keys(table, gt)
    ok = np.array([s == "ok" for s in table["status"].to_pylist()], dtype=bool)
    boxes = np.stack([_numbers(table, f"teacher_{c}", np.float64, np.nan) for c in BOX_COORDS], 1)
    has_box = ok & (keys >= 0) & ~np.isnan(boxes).any(axis=1)
    own = _numbers(table, "polisher_label", np.int64, -1)
    polished = _numbers(table, "polished_label", np.int64, -1)
    exact = bool(table["polisher_label"].null_count < table.num_rows) or not has_box.any()
    polisher_labels = np.where(own >= 0, own, polished)
    columns = {
        "teacher_labels": _numbers(table, "teacher_label", np.int64, -1),
        "teacher_scores": _numbers(table, "teacher_score", np.float32, 0.0),
        "polisher_labels": polisher_labels,
        "polisher_probs": _numbers(table, "polisher_prob", np.float32, np.nan),
    }
    ids = sorted({int(k) for k in keys[ok & (keys >= 0)]})
    truth = Truth.of(gt, set(ids))
    rows_of: dict[int, list[int]] = {k: [] for k in ids}
    for row in np.flatnonzero(has_box):  # one pass over the rows, not one per image
        rows_of[int(keys[row])].append(int(row))
    images = []
    for k in ids:
        rows = np.asarray(rows_of[k], dtype=np.int64)
        gt_boxes, gt_labels = truth(k)
        images.append(
            HeldOutImage(boxes=boxes[rows], gt_boxes=gt_boxes, gt_labels=gt_labels, image_id=k,
                         **{name: values[rows] for name, values in columns.items()})
        )  # fmt: skip
    return images, exact


def keep_rule_sweep(table: pa.Table, gt: CocoData, cls_prob: float, teacher_score: float
                    ) -> dict[str, Any]:  # fmt: skip
    """P / R / F1 of the kept boxes at every ``SWEEP_GRID`` value of each threshold, the
    other one held at the operating point (``cls_prob``, ``teacher_score``), and at the
    operating point itself."""
    images, exact = images_with_truth(table, gt)
    ious = [box_iou_np(im.boxes, im.gt_boxes) for im in images]
    out: dict[str, Any] = {
        "operating_point": rule_point(images, ious, cls_prob, teacher_score),
        "exact": exact,
        "images": len(images),
    }  # fmt: skip
    for name, value in (("cls_prob", cls_prob), ("teacher_score", teacher_score)):
        grid = sorted({*SWEEP_GRID, float(value)})
        points = [
            rule_point(images, ious, t, teacher_score) if name == "cls_prob"
            else rule_point(images, ious, cls_prob, t)
            for t in grid
        ]  # fmt: skip
        metrics = ("precision", "recall", "f1", "kept")
        out[name] = {"threshold": grid, **{m: [p[m] for p in points] for m in metrics}}
    return out
