"""Ground truth in the report's gallery (``dpl report --ann``): each kept classification
pseudo label marked a true positive (a truth box of its class at IoU >= 0.5, matched one
to one, highest teacher score first: ``evaluation.matching``) or a false positive (wrong
class or no object), and each truth box no kept label matches marked missed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dpl_tools.data.pseudo_views import BOX_COORDS
from dpl_tools.evaluation.matching import box_iou_np, greedy_match
from dpl_tools.report.draw import has_box

TP, FP = "tp", "fp"
ROW_MARK = "truth_mark"  # row key: TP or FP for a kept classification pseudo label


@dataclass
class TruthMarks:
    """An image's truth boxes (xyxy, category ids) and which of them were missed."""

    boxes: np.ndarray
    labels: np.ndarray
    missed: list[int] = field(default_factory=list)

    def counts(self, rows: list[dict[str, Any]]) -> dict[str, int]:
        """True / false positives among the kept labels, missed truths, and uncertain
        teacher boxes (not kept for classification: the ignore band)."""
        marks = [r.get(ROW_MARK) for r in rows]
        uncertain = sum(1 for r in rows if has_box(r, "teacher") and not r.get("use_cls"))
        return {"tp": marks.count(TP), "fp": marks.count(FP), "fn": len(self.missed),
                "uncertain": uncertain}  # fmt: skip


def mark_rows(rows: list[dict[str, Any]], boxes: np.ndarray, labels: np.ndarray) -> TruthMarks:
    """Mark each kept row (``use_cls``, polished box and class) TP or FP in place; return
    the image's truth with the indices of the truths no kept row matched."""
    kept = [r for r in rows if r.get("use_cls") and has_box(r, "polished")]
    pred = np.array([[r[f"polished_{c}"] for c in BOX_COORDS] for r in kept],
                    np.float64).reshape(-1, 4)  # fmt: skip
    classes = np.array([r["polished_label"] for r in kept], np.int64)
    scores = np.array([r.get("teacher_score") or 0.0 for r in kept], np.float64)
    same = classes[:, None] == labels[None, :]
    match, _ = greedy_match(box_iou_np(pred, boxes), scores, 0.5, same)
    for r, m in zip(kept, match, strict=True):
        r[ROW_MARK] = TP if m >= 0 else FP
    matched = {int(m) for m in match if m >= 0}
    return TruthMarks(boxes, labels, [i for i in range(len(boxes)) if i not in matched])
