"""Counts of a pseudo-label table: images, boxes per class before / after polishing."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpl_tools.data.pseudo_labels import META_CATEGORIES
from dpl_tools.data.pseudo_views import BOX_COORDS
from dpl_tools.evaluation.matching import paired_iou

MAX_LISTED_SKIPPED = 200


@dataclass
class LabelSummary:
    """What a polish run produced, as shown at the top of the report."""

    images_ok: int
    images_skipped: int
    images_empty: int  # looked at, no box kept
    teacher_boxes: int
    labels_changed: int
    kept_cls: int
    kept_reg: int
    before: Counter  # teacher label -> boxes (every teacher box)
    after: Counter  # polished label -> classification pseudo labels (use_cls)
    regression: Counter  # teacher label -> regression pseudo labels (use_reg)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # first (file, reason)

    @property
    def labels(self) -> list[int]:
        return sorted(set(self.before) | set(self.after) | set(self.regression))


def category_names(meta: dict[str, Any], gt_categories: list[dict] | None = None) -> dict[int, str]:
    """COCO category id -> name, from the file's metadata, else the ground truth's."""
    cats = meta.get(META_CATEGORIES) or gt_categories or []
    return {int(c["id"]): str(c["name"]) for c in cats}


def _unique_count(table: pa.Table, mask: pa.Array) -> int:
    return len(pc.unique(table.filter(mask)["file_name"]))


def _counts(values: pa.ChunkedArray) -> Counter:
    vc = pc.value_counts(values.drop_null())
    return Counter({int(v["values"]): int(v["counts"]) for v in vc.to_pylist()})


def has_teacher_box(table: pa.Table) -> pa.ChunkedArray:
    """Rows that hold a teacher box."""
    return pc.and_(pc.is_valid(table["teacher_x1"]), pc.equal(table["status"], "ok"))


def label_changed(table: pa.Table) -> pa.ChunkedArray:
    """Rows whose polished label differs from the teacher's (nulls count as unchanged)."""
    return pc.fill_null(pc.not_equal(table["teacher_label"], table["polished_label"]), False)


def box_shift_iou(table: pa.Table) -> np.ndarray:
    """IoU between teacher and polished box of every row (NaN where either is missing)."""
    cols = BOX_COORDS

    def boxes(prefix: str) -> np.ndarray:
        return np.stack(
            [
                table[f"{prefix}_{c}"].to_numpy(zero_copy_only=False).astype(np.float64)
                for c in cols
            ],
            axis=1,
        ).reshape(-1, 4)

    t, p = boxes("teacher"), boxes("polished")
    iou = paired_iou(t, p)
    iou[np.isnan(t).any(axis=1) | np.isnan(p).any(axis=1)] = np.nan
    return iou


def summarize(table: pa.Table) -> LabelSummary:
    """Count images (processed, skipped, empty) and boxes per class before / after."""
    ok = pc.equal(table["status"], "ok")
    boxed = has_teacher_box(table)
    images_ok = _unique_count(table, ok)
    with_box = _unique_count(table, boxed)
    ok_names = set(pc.unique(table.filter(ok)["file_name"]).to_pylist())
    skipped_rows = table.filter(pc.invert(ok)).select(["file_name", "error"]).to_pylist()
    skipped: dict[str, str] = {}
    for r in skipped_rows:
        if r["file_name"] not in ok_names:
            skipped.setdefault(r["file_name"], r["error"] or "skipped")
    boxes = table.filter(boxed)
    use_cls = pc.fill_null(boxes["use_cls"], False)
    use_reg = pc.fill_null(boxes["use_reg"], False)
    return LabelSummary(
        images_ok=images_ok,
        images_skipped=len(skipped),
        images_empty=images_ok - with_box,
        teacher_boxes=boxes.num_rows,
        labels_changed=int(pc.sum(label_changed(boxes)).as_py() or 0),
        kept_cls=int(pc.sum(use_cls).as_py() or 0),
        kept_reg=int(pc.sum(use_reg).as_py() or 0),
        before=_counts(boxes["teacher_label"]),
        after=_counts(boxes.filter(use_cls)["polished_label"]),
        regression=_counts(boxes.filter(use_reg)["teacher_label"]),
        skipped=sorted(skipped.items())[:MAX_LISTED_SKIPPED],
    )
