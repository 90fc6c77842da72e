"""Fit the classification keep rule's thresholds on held-out labeled images.

The paper's rule keeps a teacher box as a classification pseudo label when the
classification polisher's best foreground probability ``p >= cls_prob`` or the teacher
score ``s > teacher_score``, and relabels it to the polisher's class when
``p >= cls_prob and s < teacher_score``. Its 0.9 / 0.9 were tuned for a strong COCO
teacher; with a weak one almost nothing clears them. Here the pair is chosen on
detections of labeled images by teachers that did not train on them (out-of-fold), as the
operating point with the best F1 of class-aware pseudo labels at IoU 0.5, or the best
recall at a precision target. The rule itself is the production one
(``keep_rule.select_pseudo_labels``, in the scores' own precision: pass float32 scores
and probabilities, as polishing has, so a fitted threshold means the same in both).
The caller supplies detections and truth (``engine.keep_thresholds`` does it from
cross-fitted detections).

A fit needs something to fit on: with fewer than ``min_matches`` detections that match a
true box (class-aware, IoU 0.5), or a best F1 of 0, every operating point is noise and the
best one is often the corner that keeps nothing. Then the fitted point is not used: a
documented fallback rule is (``FALLBACK_RULES``; ``keep_all`` by default: every box at the
initial threshold stays a classification pseudo label with the teacher's label, i.e. the
raw pseudo labels), and ``source`` says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dpl_tools.engine.keep_rule import PAPER_CLS_PROB, PAPER_TEACHER_SCORE, select_pseudo_labels
from dpl_tools.evaluation.matching import box_iou_np, true_positives

# Candidate thresholds: a grid plus the paper's values (teacher_score 1.0: never keep a
# box on the teacher's score alone).
CLS_PROB_GRID = tuple(round(x, 2) for x in np.arange(0.05, 1.0, 0.05)) + (PAPER_CLS_PROB,)
TEACHER_SCORE_GRID = tuple(round(x, 2) for x in np.arange(0.5, 1.0, 0.05)) + (
    PAPER_TEACHER_SCORE,
    1.0,
)

# Fallback rules when the fit has too little to go on: (cls_prob, teacher_score).
# keep_all: cls_prob 1 relabels nothing, teacher_score 0 keeps every box (score > 0);
# paper: the paper's 0.9 / 0.9.
FALLBACK_RULES = {"keep_all": (1.0, 0.0), "paper": (PAPER_CLS_PROB, PAPER_TEACHER_SCORE)}
MIN_MATCHES = 30


@dataclass
class HeldOutImage:
    """One held-out image: teacher detections (score >= initial threshold) with the
    polisher's verdict, and the image's true boxes. Boxes xyxy, labels COCO ids."""

    boxes: np.ndarray  # [N, 4] teacher boxes
    teacher_labels: np.ndarray  # [N]
    teacher_scores: np.ndarray  # [N]
    polisher_labels: np.ndarray  # [N] polisher's best foreground class
    polisher_probs: np.ndarray  # [N] its probability
    gt_boxes: np.ndarray  # [G, 4]
    gt_labels: np.ndarray  # [G]
    image_id: int = -1
    polished_boxes: np.ndarray | None = None  # [N, 4] the regression polisher's boxes
    teacher_detections: int = 0  # the main teacher's own boxes there (score >= initial)


@dataclass
class FittedThresholds:
    """The chosen operating point and what it gives on the held-out images."""

    cls_prob: float
    teacher_score: float
    objective: str
    precision: float
    recall: float
    f1: float
    kept: int
    detections: int
    gt_boxes: int
    images: int
    matched: int = 0  # detections matching a true box one-to-one (any class)
    source: str = "fitted"  # or "fallback keep_all (why)"
    min_score: float | None = None  # the lowest teacher score of the boxes fitted on
    candidates: list[dict] = field(default_factory=list, repr=False)

    @property
    def is_fallback(self) -> bool:
        return self.source != "fitted"

    def to_dict(self) -> dict:
        """JSON-ready summary (stored in the polisher checkpoint and the Parquet metadata)."""
        return {
            "cls_prob": self.cls_prob,
            "teacher_score": self.teacher_score,
            "objective": self.objective,
            "precision50": round(self.precision, 4),
            "recall50": round(self.recall, 4),
            "f1": round(self.f1, 4),
            "kept": self.kept,
            "detections": self.detections,
            "gt_boxes": self.gt_boxes,
            "images": self.images,
            "matched": self.matched,
            "keep_rule_source": self.source,
            "min_score": self.min_score,
        }


def evaluate_rule(
    images: Sequence[HeldOutImage], ious: Sequence[np.ndarray], cls_prob: float, score: float
) -> tuple[int, int, int]:
    """(true positives, kept boxes, true boxes) of the rule at one operating point."""
    tp = kept_total = gt_total = 0
    for image, iou in zip(images, ious, strict=True):
        choice = select_pseudo_labels(
            image.teacher_labels, image.teacher_scores, image.polisher_labels,
            image.polisher_probs, cls_prob, score,
        )  # fmt: skip
        kept, labels = choice.use_cls, choice.labels
        gt_total += len(image.gt_labels)
        kept_total += int(kept.sum())
        if kept.any() and len(image.gt_labels):
            tp += true_positives(
                iou[kept], image.teacher_scores[kept], labels[kept], image.gt_labels
            )
    return tp, kept_total, gt_total


def rule_point(
    images: Sequence[HeldOutImage], ious: Sequence[np.ndarray], cls_prob: float,
    teacher_score: float,
) -> dict[str, float]:  # fmt: skip
    """The rule at one operating point: its thresholds, the kept boxes' precision, recall and
    F1 (class-aware, IoU 0.5), how many it kept and how many true boxes there are."""
    tp, kept, gt = evaluate_rule(images, ious, cls_prob, teacher_score)
    precision, recall = (tp / kept if kept else 0.0), (tp / gt if gt else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    return {"cls_prob": cls_prob, "teacher_score": teacher_score, "precision": precision,
            "recall": recall, "f1": f1, "kept": kept, "gt": gt}  # fmt: skip


def matched_detections(images: Sequence[HeldOutImage], ious: Sequence[np.ndarray]) -> int:
    """Detections that match a true box one-to-one at IoU >= 0.5, whatever their class:
    what there is to fit the keep rule on."""
    total = 0
    for image, iou in zip(images, ious, strict=True):
        if len(image.teacher_scores) and len(image.gt_labels):
            total += true_positives(iou, image.teacher_scores)
    return total


def fit_keep_thresholds(
    images: Sequence[HeldOutImage],
    precision_target: float | None = None,
    cls_prob_grid: Sequence[float] = CLS_PROB_GRID,
    teacher_score_grid: Sequence[float] = TEACHER_SCORE_GRID,
    min_matches: int = MIN_MATCHES,
    fallback: str = "keep_all",
) -> FittedThresholds:
    """Choose (cls_prob, teacher_score) on held-out images.

    Objective: the best F1 of class-aware pseudo labels at IoU 0.5; with
    ``precision_target``, the best recall among points whose precision reaches it (the best
    precision if none does). Ties go to the point with more precision, then to the higher
    thresholds (the stricter, closer to the paper's rule). With fewer than ``min_matches``
    matched detections or a best F1 of 0, the ``fallback`` rule instead (module docstring).
    """
    if fallback not in FALLBACK_RULES:
        raise ValueError(f"keep-rule fallback {fallback!r}: choose {', '.join(FALLBACK_RULES)}")
    if not images:
        raise ValueError("no held-out images to fit the keep thresholds on")
    ious = [box_iou_np(im.boxes.reshape(-1, 4), im.gt_boxes.reshape(-1, 4)) for im in images]
    candidates = [
        rule_point(images, ious, cp, ts)
        for cp in sorted(set(cls_prob_grid))
        for ts in sorted(set(teacher_score_grid))
    ]

    def order(c: dict) -> tuple:
        return (c["precision"], c["cls_prob"], c["teacher_score"])

    if precision_target is None:
        objective = "f1"
        best = max(candidates, key=lambda c: (round(c["f1"], 9), *order(c)))
    else:
        objective = f"recall at precision >= {precision_target:g}"
        reach = [c for c in candidates if c["precision"] >= precision_target]
        if reach:
            best = max(reach, key=lambda c: (round(c["recall"], 9), *order(c)))
        else:
            best = max(candidates, key=order)
    matched = matched_detections(images, ious)
    why = (
        f"{matched} matched box(es) < {min_matches}"
        if matched < min_matches
        else "best F1 0"
        if best["f1"] <= 0
        else ""
    )
    source = "fitted"
    if why:
        best = rule_point(images, ious, *FALLBACK_RULES[fallback])
        source = f"fallback {fallback} ({why})"
    scores = [im.teacher_scores for im in images if len(im.teacher_scores)]
    return FittedThresholds(
        cls_prob=float(best["cls_prob"]),
        teacher_score=float(best["teacher_score"]),
        objective=objective,
        precision=best["precision"],
        recall=best["recall"],
        f1=best["f1"],
        kept=best["kept"],
        detections=sum(len(im.teacher_scores) for im in images),
        gt_boxes=best["gt"],
        images=len(images),
        matched=matched,
        source=source,
        min_score=float(np.concatenate(scores).min()) if scores else None,
        candidates=candidates,
    )
