"""Weighted box fusion (WBF, Solovyev et al. 2021) of several detection passes.

Unlike NMS, which keeps the best box of a cluster and drops the rest, WBF averages the
boxes of a cluster, each weighted by its score. Per class, boxes are taken in descending
score order; a box joins the cluster whose fused box overlaps it most, if that IoU is above
``iou_thresh``, else it starts a new cluster. A cluster's
box is the score-weighted mean of its members; its score is the mean member score times
``min(passes, members) / passes``, so a box that only some passes found scores lower.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _iou_one(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each of ``others`` (as ``torchvision.ops.box_iou``)."""
    ix = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    union = area + (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1]) - inter
    return inter / np.maximum(union, np.finfo(np.float64).tiny)


def _fuse_class(
    boxes: np.ndarray, scores: np.ndarray, iou_thresh: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clusters of one class's boxes: (score-weighted box sums, score sums, member counts).
    A box-by-box loop in NumPy: per-box torch calls would cost ~0.1 s per image."""
    n = len(boxes)
    sums, fused = np.zeros((n, 4)), np.zeros((n, 4))
    weights, counts = np.zeros(n), np.zeros(n, dtype=np.int64)
    k = 0  # clusters so far
    for i in np.argsort(-scores, kind="stable"):
        box, score = boxes[i], scores[i]
        j = k
        if k:
            iou = _iou_one(box, fused[:k])
            best = int(iou.argmax())
            if iou[best] > iou_thresh:
                j = best
        k += j == k
        sums[j] += score * box
        weights[j] += score
        counts[j] += 1
        fused[j] = sums[j] / weights[j]
    return sums[:k], weights[:k], counts[:k]


def weighted_box_fusion(
    boxes: list[Tensor],
    scores: list[Tensor],
    labels: list[Tensor],
    iou_thresh: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fuse the detections of ``len(boxes)`` passes over one image (xyxy boxes, scores,
    labels per pass, same coordinates) into (boxes, scores, labels), by descending score.
    Boxes of different labels never fuse; zero-score boxes carry no weight and are ignored."""
    passes = len(boxes)
    if passes == 0:
        return torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long)
    device, label_dtype = boxes[0].device, labels[0].dtype
    all_boxes = torch.cat([b.detach().double().cpu().reshape(-1, 4) for b in boxes]).numpy()
    all_scores = torch.cat([s.detach().double().cpu() for s in scores]).numpy()
    all_labels = torch.cat([x.detach().cpu() for x in labels]).numpy()
    keep = all_scores > 0
    all_boxes, all_scores, all_labels = all_boxes[keep], all_scores[keep], all_labels[keep]
    out_boxes, out_scores, out_labels = [np.zeros((0, 4))], [np.zeros(0)], [all_labels[:0]]
    for label in np.unique(all_labels):
        mine = all_labels == label
        sums, weights, counts = _fuse_class(all_boxes[mine], all_scores[mine], iou_thresh)
        out_boxes.append(sums / weights[:, None])
        out_scores.append(weights / counts * np.minimum(counts, passes) / passes)
        out_labels.append(np.full(len(weights), label, dtype=all_labels.dtype))
    fused_scores = np.concatenate(out_scores)
    order = np.argsort(-fused_scores, kind="stable")
    return (
        torch.from_numpy(np.concatenate(out_boxes)[order]).float().to(device),
        torch.from_numpy(fused_scores[order]).float().to(device),
        torch.from_numpy(np.concatenate(out_labels)[order]).to(device, label_dtype),
    )
