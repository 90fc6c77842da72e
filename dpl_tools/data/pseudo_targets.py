"""Group a pseudo-label table into per-image rows, the input of the student's targets.

``pseudo_images`` keeps the processed images (``status == "ok"``) in file order, each with
its rows that hold a teacher box (any teacher coordinate or label present) as numpy
columns. Which of those rows, boxes and labels a student learns from is its supervision's
business (``dpl_tools.models.student_criterion``: a pair of the pseudo-label sets of
``dpl_tools.data.pseudo_views``): one place for the student's loss. Images processed with
no kept box have no rows (all background for the student); skipped images are left out.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpl_tools.data.pseudo_labels import BOX_COLUMNS, BOX_FIELDS

# the per-row columns a student's supervision may read (a row's box fields)
ROW_COLUMNS = BOX_FIELDS


@dataclass
class PseudoImage:
    """The pseudo-label rows of one processed image: ``rows`` maps each of ``ROW_COLUMNS``
    to a numpy array (one entry per teacher box; boxes xyxy in pixels, labels COCO ids,
    missing numbers NaN, missing flags False)."""

    file_name: str
    width: int
    height: int
    rows: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.rows["teacher_label"])


def _column(table: pa.Table, name: str) -> np.ndarray:
    if name in ("use_cls", "use_reg"):
        return np.asarray(table[name].fill_null(False).to_numpy(zero_copy_only=False), bool)
    values = table[name].to_numpy(zero_copy_only=False)
    return values if values.dtype.kind == "f" else values.astype(np.float64)


def pseudo_images(table: pa.Table) -> list[PseudoImage]:
    """Group a pseudo-label table (see ``pseudo_labels.SCHEMA``) into per-image rows."""
    ok = table.filter(pc.equal(table["status"], "ok"))
    cols = {name: _column(ok, name) for name in ROW_COLUMNS}
    names = ok["file_name"].to_numpy(zero_copy_only=False)
    widths = ok["width"].to_numpy(zero_copy_only=False)
    heights = ok["height"].to_numpy(zero_copy_only=False)
    teacher = [f"teacher_{c}" for c in BOX_COLUMNS] + ["teacher_label"]
    has_box = ~np.all(np.stack([np.isnan(cols[c].astype(np.float64)) for c in teacher]), axis=0)

    rows_by_image: dict[str, list[int]] = defaultdict(list)
    first_row: dict[str, int] = {}
    for i, name in enumerate(names):
        first_row.setdefault(name, i)
        if has_box[i]:
            rows_by_image[name].append(i)
    out = []
    for name, first in first_row.items():
        idx = np.asarray(rows_by_image.get(name, []), dtype=np.int64)
        out.append(
            PseudoImage(
                file_name=str(name),
                width=int(widths[first]),
                height=int(heights[first]),
                rows={c: v[idx] for c, v in cols.items()},
            )
        )
    return out
