"""Export pseudo labels to COCO JSON (any detection framework) or YOLO txt (ultralytics).

A single label set cannot express the paper's disentangled use (classification from one
set, box regression from another), so an export picks a *view*:

* ``polished`` (default): the classification pseudo labels (rows with ``use_cls``) with
  the polished box and the polished label: the polishers' filter for precision and their
  refined boxes for localisation (the student's non-disentangled polished view).
* ``cls``: rows with ``use_cls``, teacher box, polished label (classification labels).
* ``reg``: rows with ``use_reg``, polished box, teacher label (regression labels).
* ``teacher``: every teacher box kept at the initial threshold, teacher label (no
  polishing; the baseline).

Every processed image is listed (an image with no box gets an empty label set); skipped
images are left out. COCO annotations carry the teacher score as ``score``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpl_tools.data.pseudo_labels import META_CATEGORIES
from dpl_tools.errors import DplError
from dpl_tools.io import write_json

VIEWS = ("polished", "cls", "reg", "teacher")
# view -> (row flag or None for all rows, box prefix, label column)
_VIEW_COLUMNS = {
    "polished": ("use_cls", "polished", "polished_label"),
    "cls": ("use_cls", "teacher", "polished_label"),
    "reg": ("use_reg", "polished", "teacher_label"),
    "teacher": (None, "teacher", "teacher_label"),
}


def view_boxes(table: pa.Table, view: str = "polished") -> dict[str, Any]:
    """Images and selected boxes of one view, as numpy arrays.

    Returns ``{"images": [(image_id, file_name, width, height)], "image_id", "boxes"
    (xyxy [N,4]), "labels" (COCO category ids), "scores" (teacher scores)}``.
    """
    if view not in VIEWS:
        raise DplError(f"unknown export view {view!r} (choose from {', '.join(VIEWS)})")
    flag, prefix, label_col = _VIEW_COLUMNS[view]
    ok = table.filter(pc.equal(table["status"], "ok"))
    ids = ok["image_id"].to_numpy(zero_copy_only=False)
    names = ok["file_name"].to_pylist()
    widths = ok["width"].to_numpy(zero_copy_only=False)
    heights = ok["height"].to_numpy(zero_copy_only=False)
    images, seen = [], set()
    for i, name in enumerate(names):
        if name not in seen:
            seen.add(name)
            images.append((int(ids[i]), name, int(widths[i]), int(heights[i])))
    has_box = ok["teacher_x1"].is_valid()
    keep = has_box if flag is None else pc.and_(has_box, ok[flag].fill_null(False))
    sel = ok.filter(keep)
    boxes = (
        np.stack(
            [sel[f"{prefix}_{c}"].to_numpy(zero_copy_only=False) for c in ("x1", "y1", "x2", "y2")],
            axis=1,
        )
        .astype(np.float64)
        .reshape(-1, 4)
    )
    return {
        "images": images,
        "image_id": sel["image_id"].to_numpy(zero_copy_only=False).astype(np.int64),
        "boxes": boxes,
        "labels": sel[label_col].to_numpy(zero_copy_only=False).astype(np.int64),
        "scores": sel["teacher_score"].to_numpy(zero_copy_only=False).astype(np.float64),
    }


def _categories(meta: dict[str, Any]) -> list[dict[str, Any]]:
    cats = meta.get(META_CATEGORIES)
    if not cats:
        raise DplError(f"pseudo-label metadata lacks {META_CATEGORIES}; cannot export classes")
    return cats


def to_coco(table: pa.Table, meta: dict[str, Any], view: str = "polished") -> dict[str, Any]:
    """The pseudo labels of ``view`` as a COCO detection dict (bbox xywh, ``score`` kept)."""
    v = view_boxes(table, view)
    images = [
        {"id": image_id, "file_name": name, "width": w, "height": h}
        for image_id, name, w, h in v["images"]
    ]
    annotations = []
    for n, (image_id, (x1, y1, x2, y2), label, score) in enumerate(
        zip(v["image_id"], v["boxes"], v["labels"], v["scores"], strict=True), start=1
    ):
        w, h = float(x2 - x1), float(y2 - y1)
        annotations.append(
            {
                "id": n,
                "image_id": int(image_id),
                "category_id": int(label),
                "bbox": [round(float(x1), 2), round(float(y1), 2), round(w, 2), round(h, 2)],
                "area": round(w * h, 2),
                "iscrowd": 0,
                "score": round(float(score), 5),
            }
        )
    categories = [{"id": c["id"], "name": c["name"]} for c in _categories(meta)]
    return {
        "info": {"description": f"dpl pseudo labels ({view} view)"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def write_coco(table: pa.Table, meta: dict[str, Any], path: str | Path, view: str = "polished"):
    """Write ``to_coco`` atomically to ``path``; returns the number of annotations."""
    coco = to_coco(table, meta, view)
    write_json(path, coco)
    return len(coco["annotations"])


def write_yolo(
    table: pa.Table, meta: dict[str, Any], out_dir: str | Path, view: str = "polished"
) -> int:
    """One ``<file stem>.txt`` per processed image (``class cx cy w h``, normalised; class =
    0-based position in the category list; subfolders kept) plus ``classes.txt``.

    Written to a temporary folder renamed onto ``out_dir`` at the end (replacing it).
    Returns the number of boxes written.
    """
    out_dir = Path(out_dir)
    cats = _categories(meta)
    index_of = {c["id"]: i for i, c in enumerate(cats)}
    v = view_boxes(table, view)
    by_image: dict[int, list[str]] = {}
    for image_id, (x1, y1, x2, y2), label in zip(
        v["image_id"], v["boxes"], v["labels"], strict=True
    ):
        by_image.setdefault(int(image_id), []).append((int(label), x1, y1, x2, y2))
    tmp = out_dir.parent / f".{out_dir.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    count = 0
    for image_id, name, width, height in v["images"]:
        lines = []
        for label, x1, y1, x2, y2 in by_image.get(image_id, []):
            cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
            w, h = (x2 - x1) / width, (y2 - y1) / height
            lines.append(f"{index_of[label]} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
        txt = tmp / Path(name).with_suffix(".txt")
        txt.parent.mkdir(parents=True, exist_ok=True)
        txt.write_text("".join(line + "\n" for line in lines))
        count += len(lines)
    (tmp / "classes.txt").write_text("".join(c["name"] + "\n" for c in cats))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return count
