"""Gallery of the report: which images to show (largest corrections first) and thumbnails.

An image's correction is the largest over its boxes of ``(1 - IoU(teacher, polished))
+ 1 if the polisher changed the label``, so moved boxes and relabelled boxes come first.
Only the first ``max_images`` images get a thumbnail, so the report's time and size stay
bounded however large the run.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpl_tools.data.images import ImageReadError
from dpl_tools.report.draw import has_box, render_image
from dpl_tools.report.summary import box_shift_iou, label_changed


@dataclass
class GalleryItem:
    """One image of the gallery: its rows, correction and thumbnail (None if unreadable)."""

    file_name: str
    correction: float
    rows: list[dict[str, Any]]
    thumb: str | None = None
    error: str | None = None
    classes: set[int] = field(default_factory=set)
    truth: Any = None  # TruthMarks with dpl report --ann

    @property
    def errors(self) -> dict[str, int]:
        """TP / FP / missed counts (with the truth) and uncertain boxes."""
        if self.truth is not None:
            return self.truth.counts(self.rows)
        uncertain = sum(1 for r in self.rows if not r.get("use_cls"))
        return {"uncertain": uncertain}

    @property
    def changed(self) -> bool:
        return any(r["polished_label"] not in (None, r["teacher_label"]) for r in self.rows)


def correction_per_row(table: pa.Table) -> np.ndarray:
    """(1 - box-shift IoU) + 1 for a changed label, per row (0 for rows without boxes)."""
    shift = np.nan_to_num(1.0 - box_shift_iou(table), nan=0.0)
    changed = label_changed(table).to_numpy(zero_copy_only=False).astype(np.float64)
    return shift + changed


def select_images(table: pa.Table, max_images: int) -> list[tuple[str, float]]:
    """(file name, correction) of the ``max_images`` processed images with the largest
    correction, largest first (ties by file name)."""
    ok = table.filter(pc.equal(table["status"], "ok"))
    if ok.num_rows == 0 or max_images <= 0:
        return []
    scored = pa.table(
        {"file_name": ok["file_name"], "correction": pa.array(correction_per_row(ok))}
    )
    per_image = scored.group_by("file_name").aggregate([("correction", "max")])
    order = pc.sort_indices(
        per_image, sort_keys=[("correction_max", "descending"), ("file_name", "ascending")]
    )
    top = per_image.take(order[:max_images])
    return list(zip(top["file_name"].to_pylist(), top["correction_max"].to_pylist(), strict=True))


def gallery_items(table: pa.Table, max_images: int) -> list[GalleryItem]:
    """The selected images with their rows (largest corrections first)."""
    chosen = select_images(table, max_images)
    if not chosen:
        return []
    names = pa.array([n for n, _ in chosen], pa.string())
    subset = table.filter(
        pc.and_(pc.is_in(table["file_name"], value_set=names), pc.equal(table["status"], "ok"))
    )
    rows_by_name: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in subset.to_pylist():
        if has_box(row, "teacher"):
            rows_by_name[row["file_name"]].append(row)
    items = []
    for name, correction in chosen:
        rows = sorted(rows_by_name.get(name, []), key=lambda r: -(r["teacher_score"] or 0))
        classes = {r["teacher_label"] for r in rows} | {
            r["polished_label"] for r in rows if r["use_cls"]
        }
        items.append(GalleryItem(name, correction, rows, classes=classes - {None}))
    return items


def write_thumbnail(
    item: GalleryItem, images_dir: Path, out_dir: Path, index: int, names: dict[int, str],
    size: int,
) -> None:  # fmt: skip
    """Render ``item`` with its boxes to ``out_dir/NNNNNN.jpg``; on an unreadable image
    record the reason in ``item.error`` instead."""
    try:
        image = render_image(images_dir / item.file_name, item.rows, names, size, item.truth)
    except ImageReadError as e:
        item.error = e.reason
        return
    name = f"{index:06d}.jpg"
    image.save(out_dir / name, quality=85)
    item.thumb = name
