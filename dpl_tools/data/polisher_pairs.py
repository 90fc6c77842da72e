"""Synthesized training pairs for the polishers: noisy boxes around ground-truth boxes.

Noise models turn each GT box into noisy copies:

* ``GaussianNoise`` (the paper's): each coordinate gets independent Gaussian noise with
  std ``s*w`` (x1, x2) or ``s*h`` (y1, y2).
* ``EmpiricalNoise`` (beyond the paper): the teacher's own box errors, as offsets relative
  to the matched GT box's width/height, by object size (and score), resampled.

Per round and GT box: the regression set is ``reg_copies`` noisy copies at ``reg_scale``
plus the GT (target: the image's best-IoU GT box); the classification set is one group of
copies per ``(cls_copies[i], cls_scales[i])`` plus the GT (label: the best-IoU GT's class
if that IoU >= ``fg_iou``, else background 0). Boxes with x2 <= x1 or y2 <= y1 are dropped.
Everything is vectorized over chunks of images and written to Parquet in row groups, so
memory does not grow with the dataset.

Real pairs (``--noise-model crossfit``): the out-of-fold detections of cross-fitting
(``dpl_tools.data.crossfit_detections``) matched to the ground truth, written beside the
synthetic ones with ``source`` "real" (``real_pairs``): a regression pair per detection
with score >= ``initial_thresh`` whose best GT IoU is >= the match IoU (target: that GT),
a classification sample per detection with score >= ``min_score`` (label: the GT's class,
whatever the teacher said, if IoU >= ``fg_iou``, else background). The polisher mixes the
two sources at ``polisher.real_fraction`` when it loads them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchvision.ops import box_iou

from dpl_tools.data.coco import CocoData
from dpl_tools.data.noise_models import (
    CLS,
    REG,
    EmpiricalNoise,
    GaussianNoise,
    NoiseModel,
)
from dpl_tools.data.parquet_files import open_dpl_parquet
from dpl_tools.data.pseudo_views import BOX_COORDS
from dpl_tools.defaults import DEFAULTS
from dpl_tools.errors import DplError
from dpl_tools.io import atomic_path
from dpl_tools.settings import settings_from_section

META_KEY = b"dpl_noise"
GT_GROUP = -1  # ``group`` of the GT boxes themselves (noise groups are 0, 1, ...)
REAL_GROUP = -2  # ``group`` of real pairs (teacher detections)
SYNTHETIC, REAL = "synthetic", "real"  # values of ``source``
_PAIRS = DEFAULTS["polisher"]  # the defaults table's pair synthesis settings

PAIR_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("round", pa.int32()),
        ("kind", pa.string()),  # "reg" or "cls"
        ("x1", pa.float32()),  # noisy box (original image pixels)
        ("y1", pa.float32()),
        ("x2", pa.float32()),
        ("y2", pa.float32()),
        ("target_x1", pa.float32()),  # best-IoU GT box of the same image
        ("target_y1", pa.float32()),
        ("target_x2", pa.float32()),
        ("target_y2", pa.float32()),
        ("label", pa.int32()),  # contiguous 1..C; 0 = background (cls below fg_iou)
        ("iou", pa.float32()),  # IoU with the target box
        ("scale", pa.float32()),  # Gaussian s of the group (0 for the GT; NaN: empirical)
        ("group", pa.int32()),  # noise group index, -1 for the GT box itself, -2 real
        ("source", pa.string()),  # "synthetic" or "real" (a teacher detection)
    ]
)
# Files written before ``source`` existed are all synthetic.
REQUIRED_COLUMNS = [n for n in PAIR_SCHEMA.names if n != "source"]


@dataclass
class PairSettings:
    """Sample counts and noise scales of the two pair sets (defaults: the ``polisher``
    section of ``dpl_tools.defaults``, DESIGN's values)."""

    reg_copies: int = _PAIRS["reg_copies"]
    reg_scale: float = _PAIRS["reg_scale"]
    cls_copies: list[int] = field(default_factory=lambda: list(_PAIRS["cls_copies"]))
    cls_scales: list[float] = field(default_factory=lambda: list(_PAIRS["cls_scales"]))
    fg_iou: float = _PAIRS["fg_iou"]
    include_gt: bool = True  # the GT boxes themselves join both sets

    @classmethod
    def from_section(cls, section: dict[str, Any]) -> PairSettings:
        """The pair settings of a ``polisher`` config section (other keys ignored)."""
        return settings_from_section(cls, section)

    def groups(self, kind: str) -> list[tuple[int, float]]:
        """``(copies, scale)`` per noise group of ``kind`` (``reg`` / ``cls``)."""
        if kind == REG:
            return [(self.reg_copies, self.reg_scale)]
        if len(self.cls_copies) != len(self.cls_scales):
            raise DplError(
                f"--cls-copies ({len(self.cls_copies)} groups) and --cls-scales "
                f"({len(self.cls_scales)} groups) must have the same length"
            )
        return list(zip(self.cls_copies, self.cls_scales, strict=True))

    def rows_per_box(self) -> int:
        """Upper bound of the pairs one GT box yields per round (both kinds)."""
        return self.reg_copies + sum(self.cls_copies) + (2 if self.include_gt else 0)


@dataclass
class GroundTruth:
    """All GT boxes of a labeled set, grouped by image: image ``i`` owns rows
    ``starts[i]:starts[i+1]`` of ``boxes`` (xyxy) and ``labels`` (1..C)."""

    image_ids: np.ndarray
    starts: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray

    @classmethod
    def from_coco(cls, coco: CocoData) -> GroundTruth:
        """The non-crowd boxes of every image that has any."""
        by_image = coco.annotations_by_image()
        cat_to_label = coco.cat_to_label
        ids, counts, boxes, labels = [], [], [], []
        for rec in coco.images:
            anns = [a for a in by_image.get(rec["id"], []) if not a.get("iscrowd", 0)]
            if not anns:
                continue
            ids.append(rec["id"])
            counts.append(len(anns))
            boxes.extend(a["bbox"] for a in anns)
            labels.extend(cat_to_label[a["category_id"]] for a in anns)
        b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        b[:, 2:] += b[:, :2]
        return cls(
            np.asarray(ids, dtype=np.int64),
            np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64),
            b,
            np.asarray(labels, dtype=np.int32),
        )

    def image_boxes(self, k: int) -> np.ndarray:
        """GT boxes of the ``k``-th image."""
        return self.boxes[self.starts[k] : self.starts[k + 1]]


def _pairs_for_chunk(
    gt: GroundTruth,
    first: int,
    last: int,
    noise: NoiseModel,
    kind: str,
    settings: PairSettings,
    rngs: list[np.random.Generator],
) -> tuple[np.ndarray, ...]:
    """The ``kind`` pairs of images ``first..last-1``: (owner image index, noisy box,
    target box, label, IoU, scale, group), degenerate boxes dropped."""
    boxes = gt.boxes[gt.starts[first] : gt.starts[last]]
    owner = np.repeat(np.arange(first, last), np.diff(gt.starts[first : last + 1]))
    parts, owners, scales, group_ids = [], [], [], []
    if settings.include_gt:
        parts.append(boxes)
        owners.append(owner)
        scales.append(np.zeros(len(boxes)))
        group_ids.append(np.full(len(boxes), GT_GROUP))
    empirical = isinstance(noise, EmpiricalNoise)
    for g, (copies, scale) in enumerate(settings.groups(kind)):
        if copies <= 0:
            continue
        parts.append(noise.sample(boxes, copies, scale, kind, g, rngs[g]))
        owners.append(np.repeat(owner, copies))
        scales.append(np.full(len(boxes) * copies, np.nan if empirical else scale))
        group_ids.append(np.full(len(boxes) * copies, g))
    if not parts:
        parts, owners, scales, group_ids = [np.zeros((0, 4))], [owner[:0]], [[]], [[]]
    noisy = np.concatenate(parts).astype(np.float32)
    own = np.concatenate(owners)
    scale = np.concatenate(scales).astype(np.float32)
    group = np.concatenate(group_ids).astype(np.int32)
    valid = (noisy[:, 2] > noisy[:, 0]) & (noisy[:, 3] > noisy[:, 1])
    order = np.argsort(own[valid], kind="stable")
    noisy, own = noisy[valid][order], own[valid][order]
    scale, group = scale[valid][order], group[valid][order]
    iou = np.zeros(len(noisy), dtype=np.float32)
    target = np.zeros_like(noisy)
    label = np.zeros(len(noisy), dtype=np.int32)
    bounds = np.searchsorted(own, np.arange(first, last + 1))
    for k in range(first, last):
        a, b = bounds[k - first], bounds[k - first + 1]
        if a == b:
            continue
        g_boxes = gt.image_boxes(k)
        best, idx = box_iou(torch.from_numpy(noisy[a:b]), torch.from_numpy(g_boxes)).max(dim=1)
        idx = idx.numpy()
        iou[a:b], target[a:b] = best.numpy(), g_boxes[idx]
        label[a:b] = gt.labels[gt.starts[k] + idx]
    if kind == CLS:
        label = np.where(iou >= settings.fg_iou, label, 0).astype(np.int32)
    return own, noisy, target, label, iou, scale, group


def truth_pairs(
    boxes: np.ndarray,
    labels: np.ndarray,
    settings: PairSettings,
    rng: np.random.Generator,
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One image's pairs of both kinds drawn on the fly from its truth (xyxy ``boxes``,
    ``labels`` 1..C) with the paper's Gaussian noise, as one round of ``synthesize_pairs``
    would draw them: kind -> (noisy boxes, target boxes, labels; 0 is background)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    gt = GroundTruth(
        np.zeros(1, np.int64), np.array([0, len(boxes)], np.int64), boxes,
        np.asarray(labels, dtype=np.int32).reshape(-1),
    )  # fmt: skip
    pairs, noise = {}, GaussianNoise()
    for kind in (REG, CLS):
        rngs = [rng] * len(settings.groups(kind))
        _, noisy, target, label, *_ = _pairs_for_chunk(gt, 0, 1, noise, kind, settings, rngs)
        pairs[kind] = (noisy, target, label.astype(np.int64))
    return pairs


def synthesize_pairs(
    gt: GroundTruth,
    noise: NoiseModel,
    settings: PairSettings | None = None,
    rounds: int = 1,
    seed: int = 0,
    max_cells: int = 250_000,
) -> Iterator[pa.Table]:
    """Yield the pairs of every round as tables of about ``max_cells`` rows (whole images,
    at least one; per image its regression then its classification pairs).

    Each round, kind and noise group draws from its own seeded stream in GT-box order, so
    the output depends on ``seed`` and ``rounds`` but not on ``max_cells``.
    """
    settings = settings or PairSettings()
    settings.groups(CLS)  # validate
    counts = np.diff(gt.starts)
    n_images = len(gt.image_ids)
    per_box = max(settings.rows_per_box(), 1)
    for round_ in range(rounds):
        rngs = {
            kind: [
                np.random.default_rng([seed, round_, k, g])
                for g in range(len(settings.groups(kind)))
            ]
            for k, kind in enumerate((REG, CLS))
        }
        first = 0
        while first < n_images:
            rows = np.cumsum(counts[first:]) * per_box
            last = min(
                first + max(1, int(np.searchsorted(rows, max_cells, side="right"))), n_images
            )
            parts = [
                _pairs_for_chunk(gt, first, last, noise, kind, settings, rngs[kind])
                for kind in (REG, CLS)
            ]
            columns = [np.concatenate(c) for c in zip(*parts, strict=True)]
            kinds = np.repeat(np.array([REG, CLS]), [len(parts[0][0]), len(parts[1][0])])
            order = np.argsort(columns[0], kind="stable")  # per image: reg, then cls
            own, noisy, target, label, iou, scale, group = (c[order] for c in columns)
            n = len(own)
            yield pa.table(
                {
                    "image_id": gt.image_ids[own],
                    "round": np.full(n, round_, dtype=np.int32),
                    "kind": pa.array(kinds[order]),
                    **{c: noisy[:, i] for i, c in enumerate(BOX_COORDS)},
                    **{f"target_{c}": target[:, i] for i, c in enumerate(BOX_COORDS)},
                    "label": label,
                    "iou": iou,
                    "scale": scale,
                    "group": group,
                    "source": pa.array([SYNTHETIC] * n, pa.string()),
                },
                schema=PAIR_SCHEMA,
            )
            first = last


def match_to_truth(det: np.ndarray, gt_boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best-IoU GT box per detection: ``(iou, gt index)`` (IoU 0, index 0 without GT)."""
    if len(gt_boxes) == 0 or len(det) == 0:
        return np.zeros(len(det), np.float32), np.zeros(len(det), np.int64)
    iou, idx = box_iou(torch.from_numpy(det), torch.from_numpy(gt_boxes)).max(dim=1)
    return iou.numpy().astype(np.float32), idx.numpy()


@dataclass
class RealPairRules:
    """Which out-of-fold detections become real pairs (see the module docstring)."""

    match_iou: float = _PAIRS["empirical_min_match_iou"]
    initial_thresh: float = DEFAULTS["polish"]["initial_thresh"]  # only such are polished
    min_score: float = _PAIRS["empirical_cls_min_score"]
    fg_iou: float = _PAIRS["fg_iou"]


def real_pairs(
    gt: GroundTruth,
    detections: Iterable[tuple[int, np.ndarray, np.ndarray]],
    rules: RealPairRules,
    round_: int = 0,
) -> pa.Table:
    """The real pairs of one round from ``(image_id, boxes (N, 4) xyxy, scores)`` per image
    (images without GT boxes give background samples only), per image regression first."""
    rows_of = {int(i): k for k, i in enumerate(gt.image_ids)}
    cols: dict[str, list] = {k: [] for k in ("image_id", "kind", "box", "target", "label", "iou")}
    for image_id, det, score in detections:
        det = np.asarray(det, np.float32).reshape(-1, 4)
        score = np.asarray(score, np.float32)
        k = rows_of.get(int(image_id))
        g_boxes = gt.image_boxes(k) if k is not None else np.zeros((0, 4), np.float32)
        g_labels = gt.labels[gt.starts[k] : gt.starts[k + 1]] if k is not None else []
        iou, idx = match_to_truth(det, g_boxes)
        label = np.asarray(g_labels, np.int32)[idx] if len(g_boxes) else np.zeros(len(det))
        target = g_boxes[idx] if len(g_boxes) else np.zeros_like(det)
        valid = (det[:, 2] > det[:, 0]) & (det[:, 3] > det[:, 1])
        reg = valid & (score >= rules.initial_thresh) & (iou >= rules.match_iou)
        cls = valid & (score >= rules.min_score)
        for kind, m, lab in (
            (REG, reg, label),
            (CLS, cls, np.where(iou >= rules.fg_iou, label, 0)),
        ):
            cols["image_id"].append(np.full(int(m.sum()), int(image_id), np.int64))
            cols["kind"] += [kind] * int(m.sum())
            cols["box"].append(det[m])
            cols["target"].append(target[m])
            cols["label"].append(np.asarray(lab, np.int32)[m])
            cols["iou"].append(iou[m])
    n = len(cols["kind"])
    cat = {k: np.concatenate(v) if v and k != "kind" else v for k, v in cols.items()}
    box = cat["box"] if n else np.zeros((0, 4), np.float32)
    target = cat["target"] if n else np.zeros((0, 4), np.float32)
    return pa.table(
        {
            "image_id": cat["image_id"] if n else np.zeros(0, np.int64),
            "round": np.full(n, round_, np.int32),
            "kind": pa.array(cols["kind"], pa.string()),
            **{c: box[:, i] for i, c in enumerate(BOX_COORDS)},
            **{f"target_{c}": target[:, i] for i, c in enumerate(BOX_COORDS)},
            "label": cat["label"] if n else np.zeros(0, np.int32),
            "iou": cat["iou"] if n else np.zeros(0, np.float32),
            "scale": np.full(n, np.nan, np.float32),
            "group": np.full(n, REAL_GROUP, np.int32),
            "source": pa.array([REAL] * n, pa.string()),
        },
        schema=PAIR_SCHEMA,
    )


def mixed_rows(is_real: np.ndarray, real_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Row indices of one image's pairs of one kind such that real rows make up
    ``real_fraction`` of them (real rows repeated or subsampled; 0: synthetic only, 1: real
    only); where one source is missing, the other's rows as they are."""
    is_real = np.asarray(is_real, bool)
    real, synthetic = np.flatnonzero(is_real), np.flatnonzero(~is_real)
    if real_fraction <= 0 or not len(real):
        return synthetic
    if real_fraction >= 1 or not len(synthetic):
        return real
    want = int(round(real_fraction / (1 - real_fraction) * len(synthetic)))
    picked = np.concatenate(
        [np.tile(real, want // len(real)), rng.choice(real, want % len(real), replace=False)]
    )
    return np.sort(np.concatenate([synthetic, picked]), kind="stable")


@dataclass
class NoiseSummary:
    """What was written: rows, and per kind pairs, mean IoU, foreground share, IoU histogram."""

    rows: int = 0
    per_kind: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_source: dict[str, int] = field(default_factory=dict)


IOU_BINS = (0.0, 0.3, 0.5, 0.7, 0.9, 1.0)


def _summarize(summary: NoiseSummary, table: pa.Table) -> None:
    kinds = np.asarray(table.column("kind").to_numpy(zero_copy_only=False))
    iou = table.column("iou").to_numpy()
    label = table.column("label").to_numpy()
    summary.rows += table.num_rows
    sources, counts = np.unique(table.column("source").to_numpy(False), return_counts=True)
    for source, n in zip(sources.tolist(), counts.tolist(), strict=True):
        summary.per_source[source] = summary.per_source.get(source, 0) + n
    names = [f"{a:.1f}-{b:.1f}" for a, b in zip(IOU_BINS[:-1], IOU_BINS[1:], strict=True)]
    for kind in (REG, CLS):
        m = kinds == kind
        s = summary.per_kind.setdefault(
            kind,
            {"pairs": 0, "_iou_sum": 0.0, "_fg": 0, "iou_histogram": dict.fromkeys(names, 0)},
        )
        s["pairs"] += int(m.sum())
        s["_iou_sum"] += float(iou[m].sum())
        s["_fg"] += int((label[m] > 0).sum())
        hist, _ = np.histogram(iou[m], bins=[*IOU_BINS[:-1], 1.0001])
        for name, v in zip(names, hist, strict=True):
            s["iou_histogram"][name] += int(v)
        s["mean_iou"] = s["_iou_sum"] / s["pairs"] if s["pairs"] else float("nan")
        s["foreground_fraction"] = s["_fg"] / s["pairs"] if kind == CLS and s["pairs"] else None


def noise_metadata(
    coco: CocoData, noise: NoiseModel, settings: PairSettings, rounds: int, seed: int
) -> dict[str, Any]:
    """Key-value metadata of a noise file: classes, rounds, seed, settings, noise model."""
    meta: dict[str, Any] = {
        "categories": coco.categories,
        "source": str(coco.path),
        "rounds": rounds,
        "seed": seed,
        "settings": asdict(settings),
        "noise": noise.describe(),
    }
    if isinstance(noise, EmpiricalNoise):
        meta["empirical"] = noise.to_dict()
    return meta


def write_noise_parquet(
    out: str | Path,
    tables: Iterable[pa.Table],
    meta: dict[str, Any],
    on_chunk: Callable[[pa.Table], None] | None = None,
) -> NoiseSummary:
    """Stream ``tables`` into ``out`` (one row group each, zstd), atomically; summary."""
    schema = PAIR_SCHEMA.with_metadata({META_KEY: json.dumps(meta).encode()})
    summary = NoiseSummary()
    with atomic_path(out, suffix=".parquet") as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for table in tables:
                writer.write_table(table.cast(schema))
                _summarize(summary, table)
                if on_chunk:
                    on_chunk(table)
    for s in summary.per_kind.values():
        s.pop("_iou_sum", None)
        s.pop("_fg", None)
    return summary


def read_noise_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a noise file, or a one-line DplError naming it."""
    return open_dpl_parquet(path, "noise file", REQUIRED_COLUMNS, META_KEY,
                            "make one with dpl synth-noise")[1]  # fmt: skip
