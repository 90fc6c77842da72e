"""Export pseudo labels to COCO JSON (any detection framework) or YOLO txt (ultralytics).

A single label set cannot express the paper's disentangled use (classification from one
set, box regression from another), so an export picks a *view*: one of the pseudo-label
sets of ``dpl_tools.data.pseudo_views.LABEL_SETS``:

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

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpl_tools.data.pseudo_labels import (
    META_CATEGORIES,
    usable_boxes,
)
from dpl_tools.data.pseudo_views import LABEL_SETS
from dpl_tools.errors import DplError
from dpl_tools.io import write_json
from dpl_tools.outputs import (
    check_owned_folder,
    inside,
    owned_folder,
)

VIEWS = ("polished", "cls", "reg", "teacher")  # names in LABEL_SETS, the default first


def view_boxes(table: pa.Table, view: str = "polished") -> dict[str, Any]:
    """Images and selected boxes of one view, as numpy arrays.

    Returns ``{"images": [(image_id, file_name, width, height)], "image_id", "boxes"
    (xyxy [N,4], clipped to the image), "labels" (COCO category ids), "scores" (teacher
    scores), "dropped" (rows left out as unusable: non-finite, inverted or empty box after
    clipping, as the student's targets (``usable_boxes``), or no label or score)}``.
    """
    if view not in VIEWS:
        raise DplError(f"unknown export view {view!r} (choose from {', '.join(VIEWS)})")
    chosen = LABEL_SETS[view]
    flag = chosen.rows
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
        np.stack([sel[c].to_numpy(zero_copy_only=False) for c in chosen.box_columns], axis=1)
        .astype(np.float64)
        .reshape(-1, 4)
    )
    sizes = [sel[c].to_numpy(zero_copy_only=False).astype(np.float64) for c in ("width", "height")]
    boxes, usable = usable_boxes(boxes, *sizes)
    usable &= sel[chosen.labels].is_valid().to_numpy(zero_copy_only=False)
    usable &= np.isfinite(sel["teacher_score"].to_numpy(zero_copy_only=False).astype(np.float64))
    sel = sel.filter(pa.array(usable))
    return {
        "images": images,
        "image_id": sel["image_id"].to_numpy(zero_copy_only=False).astype(np.int64),
        "boxes": boxes[usable],
        "labels": sel[chosen.labels].to_numpy(zero_copy_only=False).astype(np.int64),
        "scores": sel["teacher_score"].to_numpy(zero_copy_only=False).astype(np.float64),
        "dropped": int((~usable).sum()),
    }


def check_view_categories(v: dict[str, Any], cats: list[dict], source: str | Path) -> None:
    """Refuse boxes whose category is not among the file's own categories."""
    unknown = sorted(set(v["labels"].tolist()) - {int(c["id"]) for c in cats})
    if unknown:
        raise DplError(
            f"{source or 'pseudo labels'}: pseudo labels use category id(s) {unknown[:5]} that "
            f"its {META_CATEGORIES} metadata does not list; the file was altered"
        )


def pseudo_categories(meta: dict[str, Any]) -> list[dict[str, Any]]:
    cats = meta.get(META_CATEGORIES)
    if not cats:
        raise DplError(f"pseudo-label metadata lacks {META_CATEGORIES}; cannot export classes")
    return cats


def to_coco(
    table: pa.Table, meta: dict[str, Any], view: str = "polished", source: str | Path = ""
) -> dict[str, Any]:
    """The pseudo labels of ``view`` as a COCO detection dict (bbox xywh, ``score`` kept);
    unusable rows left out (``view_boxes``), a category the file does not list refused."""
    v = view_boxes(table, view)
    check_view_categories(v, pseudo_categories(meta), source)
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
    categories = [{"id": c["id"], "name": c["name"]} for c in pseudo_categories(meta)]
    return {
        "info": {"description": f"dpl pseudo labels ({view} view)"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def write_coco(
    table: pa.Table,
    meta: dict[str, Any],
    path: str | Path,
    view: str = "polished",
    source: str | Path = "",
):
    """Write ``to_coco`` atomically to ``path``; returns the number of annotations."""
    coco = to_coco(table, meta, view, source)
    write_json(path, coco)
    return len(coco["annotations"])


def yolo_line(index: int, box: tuple[float, float, float, float], width: int, height: int) -> str:
    """One YOLO label line ``class cx cy w h`` (normalised) of an xyxy pixel box."""
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
    w, h = (x2 - x1) / width, (y2 - y1) / height
    return f"{index} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}"


YOLO_KIND = "yolo-labels"  # marker kind of a folder written by write_yolo
YOLO_WHAT = "a dpl YOLO export"
OVERWRITE_HINT = " or pass --overwrite to add dpl's files beside the others (nothing is deleted)"


def check_yolo_out(out_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse early (before any work) a --yolo-out that ``write_yolo`` would refuse."""
    check_owned_folder(out_dir, YOLO_KIND, YOLO_WHAT, overwrite, OVERWRITE_HINT)


def write_yolo(
    table: pa.Table,
    meta: dict[str, Any],
    out_dir: str | Path,
    view: str = "polished",
    overwrite: bool = False,
    command: str = "dpl polish --yolo-out",
    source: str | Path = "",
    save_conf: bool = False,
) -> int:
    """One ``<file stem>.txt`` per processed image (``class cx cy w h``, normalised; class =
    0-based position in the category list; subfolders kept) plus ``classes.txt``. With
    ``save_conf`` each line ends with the box's teacher score (``class cx cy w h conf``,
    ultralytics' ``save_conf`` convention).

    ``out_dir`` is a dpl-owned folder (``dpl_tools.outputs.owned_folder``): the files are
    staged, then moved in; label files of an earlier export not written again are removed,
    nothing else ever is. A file name leading outside ``out_dir`` is an error. Returns the
    number of boxes written.
    """
    out_dir = Path(out_dir)
    cats = pseudo_categories(meta)
    index_of = {c["id"]: i for i, c in enumerate(cats)}
    v = view_boxes(table, view)
    check_view_categories(v, cats, source)
    by_image: dict[int, list[str]] = {}
    for image_id, (x1, y1, x2, y2), label, score in zip(
        v["image_id"], v["boxes"], v["labels"], v["scores"], strict=True
    ):
        by_image.setdefault(int(image_id), []).append((int(label), x1, y1, x2, y2, score))
    count, written = 0, {}
    with owned_folder(out_dir, YOLO_KIND, command, YOLO_WHAT, overwrite, OVERWRITE_HINT) as tmp:
        for image_id, name, width, height in v["images"]:
            lines = []
            for label, x1, y1, x2, y2, score in by_image.get(image_id, []):
                line = yolo_line(index_of[label], (x1, y1, x2, y2), width, height)
                lines.append(f"{line} {float(score):.6f}" if save_conf else line)
            try:
                rel = Path(name).with_suffix(".txt")
            except ValueError:
                raise DplError(f"{name!r}: not a usable image file name for a YOLO label") from None
            inside(out_dir, rel, f"file name (YOLO label of image {image_id})")
            txt = inside(tmp, rel)
            if txt in written:
                raise DplError(
                    f"{name}: its YOLO label file {rel} is also that of {written[txt]} (YOLO "
                    "pairs labels with images by file stem); rename one of the images"
                )
            written[txt] = name
            txt.parent.mkdir(parents=True, exist_ok=True)
            txt.write_text("".join(line + "\n" for line in lines))
            count += len(lines)
        classes = inside(tmp, "classes.txt")
        if classes in written:
            raise DplError(
                f"{written[classes]}: its YOLO label file would be the export's classes.txt; "
                "rename the image"
            )
        classes.write_text("".join(c["name"] + "\n" for c in cats))
    return count


# A training-ready dataset: the labeled ground truth plus the pseudo labels (``dpl export``).
