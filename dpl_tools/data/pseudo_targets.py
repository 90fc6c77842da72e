"""Turn a pseudo-label table into per-image student targets, for each supervision view.

Views (``dpl train-student --pseudo-view`` / ``--no-disentangle``):

* ``polished`` + disentangled (the paper): classification targets are the rows with
  ``use_cls`` (teacher box, polished label); regression targets are the rows with
  ``use_reg`` (polished box, teacher label).
* ``polished`` without disentangling: the ``use_cls`` rows with the polished box and the
  polished label serve every loss.
* ``raw``: every teacher box kept at the initial threshold, with the teacher's label,
  serves every loss (the unpolished baseline).

Images processed with no kept box give empty targets (all background for the student);
skipped images are left out.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpl_tools.errors import DplError

VIEWS = ("polished", "raw")


@dataclass
class PseudoTargets:
    """Pseudo labels of one unlabeled image; boxes xyxy in pixels, labels are COCO ids."""

    file_name: str
    width: int
    height: int
    cls_boxes: np.ndarray
    cls_labels: np.ndarray
    reg_boxes: np.ndarray
    reg_labels: np.ndarray


def _boxes(cols: dict[str, np.ndarray], prefix: str, idx: np.ndarray) -> np.ndarray:
    return (
        np.stack([cols[f"{prefix}_{c}"][idx] for c in ("x1", "y1", "x2", "y2")], axis=1)
        .astype(np.float32)
        .reshape(-1, 4)
    )


def pseudo_targets(
    table: pa.Table, view: str = "polished", disentangle: bool = True
) -> list[PseudoTargets]:
    """Group a pseudo-label table (see ``pseudo_labels.SCHEMA``) into per-image targets."""
    if view not in VIEWS:
        raise DplError(f"unknown pseudo-label view {view!r} (choose from {', '.join(VIEWS)})")
    ok = table.filter(pc.equal(table["status"], "ok"))
    cols = {
        name: ok[name].to_numpy(zero_copy_only=False)
        for name in ok.column_names
        if name not in ("status", "error")
    }
    has_box = ~np.isnan(cols["teacher_x1"].astype(np.float64))
    use_cls = np.asarray(ok["use_cls"].fill_null(False).to_numpy(zero_copy_only=False), bool)
    use_reg = np.asarray(ok["use_reg"].fill_null(False).to_numpy(zero_copy_only=False), bool)

    rows_by_image: dict[str, list[int]] = defaultdict(list)
    first_row: dict[str, int] = {}
    for i, name in enumerate(cols["file_name"]):
        first_row.setdefault(name, i)
        if has_box[i]:
            rows_by_image[name].append(i)

    out = []
    for name, first in first_row.items():
        idx = np.asarray(rows_by_image.get(name, []), dtype=np.int64)
        if view == "raw":
            cls_idx = reg_idx = idx
            cls_box, reg_box = "teacher", "teacher"
            cls_lab, reg_lab = "teacher_label", "teacher_label"
        elif disentangle:
            cls_idx, reg_idx = idx[use_cls[idx]], idx[use_reg[idx]]
            cls_box, reg_box = "teacher", "polished"
            cls_lab, reg_lab = "polished_label", "teacher_label"
        else:
            cls_idx = reg_idx = idx[use_cls[idx]]
            cls_box = reg_box = "polished"
            cls_lab = reg_lab = "polished_label"
        out.append(
            PseudoTargets(
                file_name=str(name),
                width=int(cols["width"][first]),
                height=int(cols["height"][first]),
                cls_boxes=_boxes(cols, cls_box, cls_idx),
                cls_labels=cols[cls_lab][cls_idx].astype(np.int64),
                reg_boxes=_boxes(cols, reg_box, reg_idx),
                reg_labels=cols[reg_lab][reg_idx].astype(np.int64),
            )
        )
    return out
