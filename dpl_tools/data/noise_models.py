"""The box-noise models that turn a ground-truth box into the noisy boxes the polishers
learn to correct:

* ``GaussianNoise`` (the paper's): each coordinate gets independent Gaussian noise with
  std ``s*w`` (x1, x2) or ``s*h`` (y1, y2).
* ``EmpiricalNoise`` (beyond the paper): the teacher's own box errors, as offsets relative
  to the matched GT box's width/height, by object size (and score), resampled; fitted from
  detections matched to truth by ``empirical_from_matches``.

Pair synthesis from a model is ``dpl_tools.data.polisher_pairs``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

from dpl_tools.errors import DplError

REG = "reg"  # the kinds of training pair: regression ...
CLS = "cls"  # ... and classification


def _wh4(boxes: np.ndarray) -> np.ndarray:
    """(w, h, w, h) per box, w and h clamped to >= 1 px."""
    wh = np.maximum(boxes[:, 2:] - boxes[:, :2], 1.0)
    return np.concatenate([wh, wh], axis=1)


def _box_size(boxes: np.ndarray) -> np.ndarray:
    """sqrt(w * h) per box (w, h clamped to >= 1 px)."""
    return np.sqrt(np.prod(np.maximum(boxes[:, 2:] - boxes[:, :2], 1.0), axis=1))


class GaussianNoise:
    """The paper's noise: independent N(0, (s*w)^2) / N(0, (s*h)^2) per coordinate."""

    name = "gaussian"

    def sample(
        self,
        boxes: np.ndarray,
        copies: int,
        scale: float,
        kind: str,
        group: int,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """``copies`` noisy copies per box, a box's copies adjacent: ``(N*copies, 4)``."""
        noise = rng.standard_normal((len(boxes), copies, 4), dtype=np.float32)
        noisy = boxes[:, None] + noise * np.float32(scale) * _wh4(boxes)[:, None]
        return noisy.reshape(-1, 4)

    def describe(self) -> dict[str, Any]:
        return {"model": self.name}


@dataclass
class EmpiricalNoise:
    """The teacher's own errors: per matched detection, its offsets from the GT box
    relative to the GT's (w, h, w, h), the GT size sqrt(w*h), the detection score and IoU.

    A GT box's noisy copies are the GT plus ``inflate`` x resampled relative offsets of
    detections on GT boxes of the same size bin (``size_edges``): for regression pairs and
    the first classification group (the small-noise one) only confident detections (score
    >= ``reg_min_score``), for the other classification groups all detections with score
    >= ``cls_min_score`` (low-score detections are the ones with large errors).
    """

    offsets: np.ndarray  # (M, 4) relative
    sizes: np.ndarray  # (M,)
    scores: np.ndarray  # (M,)
    ious: np.ndarray  # (M,) IoU with the matched GT
    size_edges: list[float] = field(default_factory=list)
    reg_min_score: float = 0.5
    cls_min_score: float = 0.05
    inflate: float = 1.0
    name: str = "empirical"

    def __post_init__(self) -> None:
        self.offsets = np.asarray(self.offsets, np.float32).reshape(-1, 4)
        self.sizes = np.asarray(self.sizes, np.float32)
        self.scores = np.asarray(self.scores, np.float32)
        self.ious = np.asarray(self.ious, np.float32)
        self._bins = np.searchsorted(self.size_edges, self.sizes, side="right")

    def _pool(self, strict: bool, size_bin: int) -> np.ndarray:
        """Indices of the errors to resample for a GT box of ``size_bin``."""
        ok = self.scores >= (self.reg_min_score if strict else self.cls_min_score)
        if not ok.any():
            ok = np.ones_like(ok)
        pool = np.flatnonzero(ok & (self._bins == size_bin))
        return pool if len(pool) else np.flatnonzero(ok)

    def sample(
        self,
        boxes: np.ndarray,
        copies: int,
        scale: float,
        kind: str,
        group: int,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """``copies`` noisy copies per box (``scale`` unused): ``(N*copies, 4)``."""
        bins = np.searchsorted(self.size_edges, _box_size(boxes), side="right")
        # One uniform per copy, drawn in box order: the stream does not depend on chunking.
        u = rng.random((len(boxes), copies))
        rel = np.empty((len(boxes), copies, 4), dtype=np.float32)
        strict = kind == REG or group == 0
        for b in np.unique(bins):
            rows = np.flatnonzero(bins == b)
            pool = self._pool(strict, int(b))
            pick = np.minimum((u[rows] * len(pool)).astype(np.int64), len(pool) - 1)
            rel[rows] = self.offsets[pool[pick]]
        noisy = boxes[:, None] + rel * np.float32(self.inflate) * _wh4(boxes)[:, None]
        return noisy.reshape(-1, 4)

    def describe(self) -> dict[str, Any]:
        """Counts, relative std (x1, y1, x2, y2) and mean IoU of the fitted errors, overall
        and per size bin x score bin."""
        confident = self.scores >= self.reg_min_score

        def stats(m: np.ndarray) -> tuple[list[float], float]:
            if m.sum() < 2:
                return [float("nan")] * 4, float("nan")
            return [round(float(v), 4) for v in self.offsets[m].std(0)], float(self.ious[m].mean())

        cells = []
        score_edges = [0.0, 0.5, 0.7, 0.9, 1.01]
        for b in range(len(self.size_edges) + 1):
            for lo, hi in zip(score_edges[:-1], score_edges[1:], strict=True):
                m = (self._bins == b) & (self.scores >= lo) & (self.scores < hi)
                std, iou = stats(m)
                cells.append(
                    {
                        "size_bin": b,
                        "score": [lo, min(hi, 1.0)],
                        "count": int(m.sum()),
                        "relative_std": std,
                        "mean_iou": iou,
                    }  # fmt: skip
                )
        std, iou = stats(confident)
        return {
            "model": self.name,
            "matched_detections": len(self.scores),
            "confident_detections": int(confident.sum()),
            "relative_std_confident": std,
            "mean_iou_confident": iou,
            "size_edges": [float(e) for e in self.size_edges],
            "inflate": self.inflate,
            "cells": cells,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "offsets": self.offsets.tolist(),
            "sizes": self.sizes.tolist(),
            "scores": self.scores.tolist(),
            "ious": self.ious.tolist(),
            "size_edges": list(self.size_edges),
            "reg_min_score": self.reg_min_score,
            "cls_min_score": self.cls_min_score,
            "inflate": self.inflate,
        }


def empirical_from_matches(
    matches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    min_match_iou: float = 0.5,
    reg_min_score: float = 0.5,
    cls_min_score: float = 0.05,
    num_size_bins: int = 3,
    inflate: float = 1.0,
) -> EmpiricalNoise:
    """Fit from ``(det_boxes, det_scores, gt_boxes)`` per image: each detection whose best
    GT IoU is >= ``min_match_iou`` contributes its relative offsets from that GT box.
    Size bins are quantiles of the matched GT sizes."""
    offsets, sizes, scores, ious = [], [], [], []
    for det, score, gt in matches:
        det, score, gt = (np.asarray(a, dtype=np.float32).copy() for a in (det, score, gt))
        if len(det) == 0 or len(gt) == 0:
            continue
        iou, idx = box_iou(torch.from_numpy(det), torch.from_numpy(gt)).max(dim=1)
        ok = (iou >= min_match_iou).numpy()
        g = gt[idx.numpy()[ok]]
        offsets.append((det[ok] - g) / _wh4(g))
        sizes.append(_box_size(g))
        scores.append(score[ok])
        ious.append(iou.numpy()[ok])
    if sum(len(o) for o in offsets) == 0:
        raise DplError("empirical noise: no teacher detection matched a ground-truth box")
    sizes_a = np.concatenate(sizes)
    edges = np.quantile(sizes_a, np.linspace(0, 1, num_size_bins + 1)[1:-1]).tolist()
    return EmpiricalNoise(
        np.concatenate(offsets),
        sizes_a,
        np.concatenate(scores),
        np.concatenate(ious),
        sorted(set(edges)),
        reg_min_score,
        cls_min_score,
        inflate,
    )


NoiseModel = GaussianNoise | EmpiricalNoise
