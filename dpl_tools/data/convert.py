"""Convert Pascal VOC XML and YOLO txt annotations into one validated COCO detection set.

Conventions (tested with exact numbers):

* COCO ids: images ``1..N`` in sorted file order (or the ImageSets split order),
  categories ``1..C`` in class order, annotations ``1..M``. ``file_name`` is relative
  to the images folder, which the conversion returns (pass it to later commands as
  ``--images``).
* VOC pixel coordinates are 1-based and inclusive (the VOC devkit convention), so a
  box ``xmin..xmax`` becomes COCO ``x = xmin - 1``, ``w = xmax - xmin + 1`` (same for y).
  A box whose corners coincide or are reversed (``xmax <= xmin`` or ``ymax <= ymin``) is
  an empty drag, not a 1-pixel object: it gets ``w = xmax - xmin`` / ``h = ymax - ymin``
  (zero or negative), so validation drops and counts it. Boxes reaching outside the
  image are clipped and counted by validation.
* VOC ``difficult`` objects are kept as ordinary boxes (``iscrowd = 0``) and carry
  ``"difficult": 1`` in their annotation; ``skip_difficult`` drops them (counted).
* YOLO rows ``class cx cy w h`` (normalised to 0..1) become absolute COCO
  ``[(cx - w/2) * W, (cy - h/2) * H, w * W, h * H]`` with W, H read from the image
  header (EXIF rotation applied); polygon rows (segmentation labels) become their
  bounding box; class ``k`` becomes category id ``k + 1``.
* One bad annotation file (malformed XML, a bad or non-UTF-8 YOLO label file, a
  non-finite number, a class name with a control character, a VOC XML whose image another
  XML already annotates) skips that file and its image; ``Conversion.skipped_files`` lists
  each with the problem (``strict`` stops at the first instead). Image-folder entries that
  are not readable images (folders named like images, broken or looping links, names
  that are not UTF-8) are listed there too.
* Class-name files (``data.yaml``, ``classes.txt``) and VOC split lists are read as UTF-8
  (YAML through the alias-bomb-safe ``dpl_tools.textfiles`` loader); a bad one, or a class
  name with a control character or given twice, is a DplError naming the file.
* A conversion that leaves no image, or drops every box the input had, is a DplError:
  an empty dataset is never written. The boxes of a skipped file count as the input's
  (a YOLO label file with one bad line among background images writes nothing), and each
  skipped file is counted in the validation report too, so a run that skipped files never
  reports "no problems found".
"""

from __future__ import annotations

from pathlib import Path

from dpl_tools.data.coco import (
    read_json,
    validate_coco,
)
from dpl_tools.data.conversion import Conversion
from dpl_tools.data.review import REVIEW_FORMATS, convert_review
from dpl_tools.data.voc import convert_voc
from dpl_tools.data.yolo_labels import convert_yolo
from dpl_tools.errors import DplError

FORMATS = ("voc", "yolo", "coco", *REVIEW_FORMATS)
# The validation report's line for the files a conversion skipped (each listed in the
# skipped-files table with its problem).
SKIPPED_FILE = "unusable file (skipped, listed below)"


def convert_coco(
    src: str | Path, images_dir: str | Path | None = None, allow_outside_root: bool = False
) -> Conversion:
    """Validate a COCO JSON (checking image files when ``images_dir`` is given)."""
    if images_dir is not None and not Path(images_dir).is_dir():
        raise DplError(f"{images_dir}: images folder not found")
    raw = read_json(src)
    coco = validate_coco(raw, src, images_dir, allow_outside_root=allow_outside_root)
    anns = raw.get("annotations") if isinstance(raw, dict) else None
    n_boxes = len(anns) if isinstance(anns, list) else 0
    return Conversion(coco, Path(images_dir) if images_dir else None, input_boxes=n_boxes)


def require_usable(result: Conversion, src: str | Path) -> Conversion:
    """``result``, or a one-line DplError when nothing usable is left: no image, or every
    box of the input dropped (the problems table says why)."""
    coco, skipped = result.coco, len(result.skipped_files)
    if not coco.images:
        dropped = {p: n for p, n in coco.report.counts.items() if "image" in p and "dropped" in p}
        if dropped:
            problem, n = max(dropped.items(), key=lambda kv: kv[1])
            why = f"{n} x {problem}, e.g. {coco.report.examples[problem]}"
        elif skipped:
            why = f"{skipped} file(s) skipped, e.g. {': '.join(result.skipped_files[0])}"
        else:
            why = "the input lists no images"
        raise DplError(f"{src}: no usable image left, nothing written ({why})")
    if result.input_boxes and not coco.annotations:
        why = (
            f"{skipped} file(s) skipped, e.g. {': '.join(result.skipped_files[0])}"
            if skipped
            else "see the problems above: wrong --classes? boxes outside the images?"
        )
        raise DplError(
            f"{src}: all {result.input_boxes} boxes of the input were dropped, nothing written "
            f"({why})"
        )
    return result


def convert(
    fmt: str,
    src: str | Path,
    split: str | None = None,
    classes: list[str] | None = None,
    images_dir: str | Path | None = None,
    skip_difficult: bool = False,
    progress: bool = True,
    strict: bool = False,
    allow_outside_root: bool = False,
) -> Conversion:
    """Dispatch on ``fmt`` (voc, yolo, coco, label-studio, cvat); bad files are skipped
    unless ``strict``.

    The set is not checked for being usable: see ``require_usable``. Each skipped file is
    counted in the set's validation report (``SKIPPED_FILE``).
    """
    if fmt == "voc":
        result = convert_voc(src, split, classes, images_dir, skip_difficult, progress, strict)
    elif fmt == "yolo":
        result = convert_yolo(src, split, classes, progress, strict)
    elif fmt == "coco":
        result = convert_coco(src, images_dir, allow_outside_root)
    elif fmt in REVIEW_FORMATS:
        result = convert_review(fmt, src, classes, images_dir, allow_outside_root)
    else:
        raise DplError(f"unknown format '{fmt}' (choose from {', '.join(FORMATS)})")
    for name, problem in result.skipped_files:
        result.coco.report.add(SKIPPED_FILE, f"{name}: {problem}")
    return result
