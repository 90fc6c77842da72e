"""Perfect pseudo labels: a COCO ground truth written in the pseudo-label format.

A benchmark diagnostic. A student trained on these learns its unlabeled images' true
boxes and classes through exactly the path that polished pseudo labels take (the same
mixing of labeled and pseudo-labeled images, augmentation and losses), so its score is
the ceiling of what any teacher and polisher could give that student. The oracle of the
benchmarks (the labeled-only recipe on every label) differs from it in its sampling; the
gap between the two is the recipe's, not the pseudo labels'.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dpl_tools import __version__
from dpl_tools.data.coco import CocoData
from dpl_tools.data.pseudo_label_writer import append_row, empty_columns, rows_to_table
from dpl_tools.data.pseudo_labels import (
    META_BOXES,
    META_CATEGORIES,
    META_THRESHOLDS,
    META_VERSION,
)
from dpl_tools.data.pseudo_views import BOX_COORDS
from dpl_tools.io import atomic_path

TRUTH_SOURCE = "truth"  # META_BOXES source of these files


def truth_pseudo_labels(gt: CocoData) -> pa.Table:
    """One pseudo-label row per truth box, teacher and polished views both the true box and
    class, score and polisher probability 1, kept for classification and regression; a
    crowd region is a row kept for neither (an ignore region with ``--negatives ignore``).
    An image without boxes has its one empty row, as ``dpl polish`` writes it."""
    columns = empty_columns()
    by_image = gt.annotations_by_image()
    for im in gt.images:
        base = {"image_id": im["id"], "file_name": im["file_name"], "width": im["width"],
                "height": im["height"], "status": "ok"}  # fmt: skip
        anns = by_image.get(im["id"], [])
        if not anns:
            append_row(columns, base)
        for ann in anns:
            x, y, w, h = ann["bbox"]
            box = dict(zip(BOX_COORDS, (x, y, x + w, y + h), strict=True))
            cat, kept = ann["category_id"], not ann.get("iscrowd")
            append_row(columns, {**base, **{f"teacher_{c}": v for c, v in box.items()},
                    **{f"polished_{c}": v for c, v in box.items()},
                    "teacher_label": cat, "teacher_score": 1.0, "polished_label": cat,
                    "polisher_prob": 1.0, "polisher_label": cat,
                    "use_cls": kept, "use_reg": kept})  # fmt: skip
    meta = {
        META_CATEGORIES: [{"id": c["id"], "name": c["name"]} for c in gt.categories],
        META_THRESHOLDS: {"keep_rule_source": TRUTH_SOURCE},
        META_BOXES: {"source": TRUTH_SOURCE, "file": str(gt.path)},
        META_VERSION: __version__,
    }
    return rows_to_table(columns, meta)


def write_truth_pseudo_labels(gt: CocoData, out: str | Path) -> Path:
    """``truth_pseudo_labels`` written to ``out`` (a temporary file renamed on success)."""
    table = truth_pseudo_labels(gt)
    with atomic_path(out, ".parquet") as tmp:
        pq.write_table(table, tmp)
    return Path(out)
