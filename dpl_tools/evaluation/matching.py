"""Matching predicted boxes to true boxes, one implementation for every figure that
counts true positives: the keep rule's fitting (``engine/fit_thresholds.py``), the
pseudo-label quality table and the report, so the F1 a rule is fitted on and the precision
reported to the user are counted the same way."""

from __future__ import annotations

import numpy as np


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of xyxy boxes (torchvision.ops.box_iou)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    import torch  # here: the figures' modules load without torch (``dpl --help``)
    from torchvision.ops import box_iou

    return box_iou(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b)).numpy()


def paired_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of a[i] with b[i] for two (N, 4) xyxy arrays."""
    ix = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = ix * iy
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a + area_b - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def greedy_match(
    iou: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    same_class: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """COCO-style greedy matching of predictions (rows of ``iou``) to truths (columns).

    Predictions go in descending score order; each takes the still unmatched truth with
    the highest IoU >= ``threshold`` (restricted to ``same_class`` pairs when given).
    Returns (matched truth index or -1, IoU of the match or 0) per prediction.
    """
    n_pred, n_gt = iou.shape
    match = np.full(n_pred, -1, dtype=np.int64)
    match_iou = np.zeros(n_pred)
    if n_pred == 0 or n_gt == 0:
        return match, match_iou
    candidates = np.where(same_class, iou, -1.0) if same_class is not None else iou.copy()
    taken = np.zeros(n_gt, dtype=bool)
    for p in np.argsort(-scores, kind="stable"):
        row = np.where(taken, -1.0, candidates[p])
        g = int(np.argmax(row))
        if row[g] >= threshold:
            match[p], match_iou[p] = g, row[g]
            taken[g] = True
    return match, match_iou


def true_positives(
    iou: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray | None = None,
    gt_labels: np.ndarray | None = None,
    threshold: float = 0.5,
) -> int:
    """Predictions matched one-to-one to a truth at IoU >= ``threshold`` by
    ``greedy_match``: class-aware when ``labels`` and ``gt_labels`` are given."""
    same = None
    if labels is not None and gt_labels is not None:
        same = np.asarray(labels)[:, None] == np.asarray(gt_labels)[None, :]
    match, _ = greedy_match(np.asarray(iou, dtype=np.float64), np.asarray(scores), threshold, same)
    return int((match >= 0).sum())
