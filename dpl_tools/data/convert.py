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
  an empty dataset is never written.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import track

from dpl_tools.data.coco import (
    CocoData,
    ValidationReport,
    name_problem,
    read_json,
    validate_coco,
)
from dpl_tools.data.images import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    display_path,
    image_size,
    scan_images,
    utf8_name,
)
from dpl_tools.data.review import REVIEW_FORMATS, convert_review
from dpl_tools.errors import DplError
from dpl_tools.textfiles import read_text, read_yaml_file

FORMATS = ("voc", "yolo", "coco", *REVIEW_FORMATS)


@dataclass
class Conversion:
    """A converted, validated set and the folder its ``file_name``s are relative to."""

    coco: CocoData
    images_dir: Path | None
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (file, problem)
    input_boxes: int = 0  # boxes in the input files read, before validation


class _Skips:
    """Collects files skipped as unusable, or re-raises at the first with ``strict``."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.files: list[tuple[str, str]] = []

    def add(self, path: Path | str, problem: str) -> None:
        if self.strict:
            raise DplError(f"{display_path(path)}: {problem} (--strict)")
        self.files.append((display_path(path), problem))

    def error(self, path: Path, e: DplError) -> None:
        """Record a DplError about ``path`` (its message minus the leading path)."""
        message = str(e)
        for prefix in (f"{path}:", f"{display_path(path)}:"):
            message = message.removeprefix(prefix)
        if self.strict:
            raise e
        self.files.append((display_path(path), message.strip()))


# --------------------------------------------------------------------------- VOC


@dataclass
class VocObject:
    name: str
    xmin: float
    ymin: float
    xmax: float
    ymax: float
    difficult: bool


@dataclass
class VocRecord:
    xml_path: Path
    filename: str | None
    width: int | None
    height: int | None
    objects: list[VocObject]


def _text(node: ET.Element | None, tag: str) -> str | None:
    child = node.find(tag) if node is not None else None
    return child.text.strip() if child is not None and child.text else None


def parse_voc_xml(path: str | Path) -> VocRecord:
    """Read one VOC annotation file; malformed XML or boxes raise DplError naming it."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DplError(f"{path}: not valid XML ({e})") from None
    except OSError as e:
        raise DplError(f"{path}: cannot read ({e})") from None
    if root.tag != "annotation":
        raise DplError(f"{path}: not a VOC annotation (root element <{root.tag}>)")
    size = root.find("size")
    width = height = None
    try:
        w, h = _text(size, "width"), _text(size, "height")
        if w and h and not (math.isfinite(float(w)) and math.isfinite(float(h))):
            raise DplError(f"{path}: <size> {w}x{h} is not a finite number")
        if w and h and float(w) > 0 and float(h) > 0:
            width, height = int(float(w)), int(float(h))
    except ValueError:
        raise DplError(f"{path}: <size> is not numeric") from None
    objects = []
    for i, obj in enumerate(root.findall("object")):
        name = _text(obj, "name")
        box = obj.find("bndbox")
        coords = [_text(box, k) for k in ("xmin", "ymin", "xmax", "ymax")]
        if not name or None in coords:
            raise DplError(f"{path}: object #{i} lacks <name> or a complete <bndbox>")
        if name_problem(name):
            raise DplError(f"{path}: object #{i}: class name {name!r} {name_problem(name)}")
        try:
            xmin, ymin, xmax, ymax = (float(c) for c in coords)
        except ValueError:
            raise DplError(f"{path}: object #{i} ({name}) has non-numeric box {coords}") from None
        if not all(math.isfinite(v) for v in (xmin, ymin, xmax, ymax)):
            raise DplError(f"{path}: object #{i} ({name}) has a non-finite box {coords}")
        difficult = (_text(obj, "difficult") or "0") not in ("0", "false", "False")
        objects.append(VocObject(name, xmin, ymin, xmax, ymax, difficult))
    return VocRecord(path, _text(root, "filename"), width, height, objects)


def voc_box_to_coco(xmin: float, ymin: float, xmax: float, ymax: float) -> list[float]:
    """1-based inclusive VOC corners to COCO ``[x, y, w, h]`` (see module docstring)."""
    w = xmax - xmin + 1 if xmax > xmin else xmax - xmin
    h = ymax - ymin + 1 if ymax > ymin else ymax - ymin
    return [xmin - 1, ymin - 1, w, h]


def _first_dir(root: Path, names: Iterable[str]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _voc_layout(src: Path, images: Path | None) -> tuple[Path, Path | None, Path]:
    """(XML folder, images folder or None, VOC root) for a VOC root or a plain XML folder."""
    if not src.is_dir():
        raise DplError(f"{src}: not a directory (expected a VOC root or a folder of XML files)")
    xml_dir = _first_dir(src, ("Annotations", "annotations"))
    root = src if xml_dir is not None else src.parent
    xml_dir = xml_dir or src
    if images is None:
        images = _first_dir(root, ("JPEGImages", "images", "Images"))
        if images is None and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in xml_dir.iterdir()):
            images = xml_dir
    elif not images.is_dir():
        raise DplError(f"{images}: images folder not found")
    return xml_dir, images, root


def _voc_split_ids(root: Path, split: str) -> list[str]:
    main = root / "ImageSets" / "Main"
    split_file = main / f"{split}.txt"
    if not split_file.is_file():
        found = sorted(p.stem for p in main.glob("*.txt")) if main.is_dir() else []
        hint = f" (available: {', '.join(found)})" if found else " (no ImageSets/Main folder)"
        raise DplError(f"{split_file}: split '{split}' not found{hint}")
    lines = read_text(split_file).splitlines()  # one-line DplError when not UTF-8
    return [line.split()[0] for line in lines if line.strip()]


def _resolve_image(images_dir: Path | None, stem: str, filename: str | None) -> str:
    """file_name relative to images_dir: the XML's <filename> if it exists, else by stem."""
    if images_dir is not None:
        if filename and (images_dir / filename).is_file():
            return filename
        for ext in IMAGE_EXTENSIONS:
            for candidate in (stem + ext, stem + ext.upper()):
                if (images_dir / candidate).is_file():
                    return candidate
    return filename or f"{stem}.jpg"


def convert_voc(
    src: str | Path,
    split: str | None = None,
    classes: list[str] | None = None,
    images_dir: str | Path | None = None,
    skip_difficult: bool = False,
    progress: bool = True,
    strict: bool = False,
) -> Conversion:
    """Convert a VOC root (Annotations/, JPEGImages/, ImageSets/Main) or an XML folder;
    a bad XML file is skipped and listed (``strict``: a DplError)."""
    src = Path(src)
    xml_dir, images, root = _voc_layout(src, Path(images_dir) if images_dir else None)
    report = ValidationReport(src)
    if split is not None:
        xml_paths = []
        for stem in _voc_split_ids(root, split):
            if (xml_dir / f"{stem}.xml").is_file():
                xml_paths.append(xml_dir / f"{stem}.xml")
            else:
                report.add("listed in the split but no XML (skipped)", stem)
    else:
        xml_paths = sorted(xml_dir.glob("*.xml"))
    if not xml_paths:
        raise DplError(f"{xml_dir}: no VOC XML files found")

    skips = _Skips(strict)
    records = []
    for p in track(xml_paths, description="reading VOC XML", disable=not progress):
        try:
            records.append(parse_voc_xml(p))
        except DplError as e:
            skips.error(p, e)
    input_boxes = sum(len(r.objects) for r in records)
    names = classes or sorted({o.name for r in records for o in r.objects})
    cat_id = {n: i + 1 for i, n in enumerate(names)}
    raw_images: list[dict[str, Any]] = []
    raw_anns: list[dict[str, Any]] = []
    annotated_by: dict[str, Path] = {}  # file_name -> XML: one image, one annotation file
    for rec in records:
        file_name = _resolve_image(images, rec.xml_path.stem, rec.filename)
        if file_name in annotated_by:
            skips.add(
                rec.xml_path,
                f"its image {file_name} is already annotated by {annotated_by[file_name].name}",
            )
            continue
        annotated_by[file_name] = rec.xml_path
        width, height = rec.width, rec.height
        if width is None or height is None:
            if images is None:
                report.add(
                    "no <size> and no image to read it from (image dropped)", str(rec.xml_path)
                )
                continue
            try:
                width, height = image_size(images / file_name)
            except ImageReadError as e:
                report.add("no <size> and image unreadable (image dropped)", str(e))
                continue
        image_id = len(raw_images) + 1
        raw_images.append(
            {"id": image_id, "file_name": file_name, "width": width, "height": height}
        )
        for obj in rec.objects:
            if obj.name not in cat_id:
                report.add("class not in --classes (box dropped)", f"{rec.xml_path}: {obj.name}")
                continue
            if obj.difficult and skip_difficult:
                report.add("difficult object (dropped)", str(rec.xml_path))
                continue
            bbox = voc_box_to_coco(obj.xmin, obj.ymin, obj.xmax, obj.ymax)
            ann = {
                "id": len(raw_anns) + 1,
                "image_id": image_id,
                "category_id": cat_id[obj.name],
                "bbox": bbox,
                "area": max(bbox[2], 0) * max(bbox[3], 0),
                "iscrowd": 0,
            }
            if obj.difficult:
                ann["difficult"] = 1
            raw_anns.append(ann)
    categories = [{"id": i + 1, "name": n, "supercategory": "none"} for i, n in enumerate(names)]
    raw = {"images": raw_images, "annotations": raw_anns, "categories": categories}
    coco = validate_coco(raw, src, images)
    report.merge(coco.report)
    coco.report = report
    return Conversion(coco, images, skips.files, input_boxes)


# -------------------------------------------------------------------------- YOLO


def _yolo_layout(src: Path, split: str | None) -> tuple[Path, Path]:
    """(images folder, labels folder) for the ultralytics layout or txt beside images."""
    if not src.is_dir():
        raise DplError(f"{src}: not a directory (expected a YOLO dataset folder)")
    if split is not None:
        for images, labels in (
            (src / "images" / split, src / "labels" / split),
            (src / split / "images", src / split / "labels"),
        ):
            if images.is_dir():
                return images, labels
        raise DplError(
            f"{src}: split '{split}' not found (looked for images/{split}/ and {split}/images/)"
        )
    if (src / "images").is_dir():
        return src / "images", src / "labels"
    return src, src


def _checked_names(path: Path, names: list[str]) -> list[str]:
    """Class names read from ``path``, or a DplError naming it for a name with a control
    character (it would break classes.txt) or a name given twice."""
    for i, name in enumerate(names):
        if name_problem(name):
            raise DplError(f"{path}: class {i} name {name!r} {name_problem(name)}")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise DplError(f"{path}: class {i} repeats the name {name!r} of class {seen[name]}")
        seen[name] = i
    return names


def _names_from_yaml(path: Path) -> list[str]:
    return _checked_names(path, _yaml_names(path))


def _yaml_names(path: Path) -> list[str]:
    data = read_yaml_file(path)  # one-line DplError: not UTF-8, invalid YAML, alias bomb
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, list):
        return [str(n) for n in names]
    if isinstance(names, dict):
        try:
            by_index = {int(k): str(v) for k, v in names.items()}
        except ValueError:
            raise DplError(f"{path}: 'names' keys must be class indices") from None
        if sorted(by_index) != list(range(len(by_index))):
            raise DplError(f"{path}: 'names' indices must be 0..{len(by_index) - 1}")
        return [by_index[i] for i in range(len(by_index))]
    raise DplError(f"{path}: no 'names' list or mapping")


def yolo_class_names(src: Path, images: Path, labels: Path) -> list[str]:
    """Class names from data.yaml / dataset.yaml (``names`` list or dict) or classes.txt."""
    for folder in dict.fromkeys((src, src.parent, labels, images)):
        for name in ("data.yaml", "dataset.yaml"):
            if (folder / name).is_file():
                return _names_from_yaml(folder / name)
        if (folder / "classes.txt").is_file():
            text = read_text(folder / "classes.txt")  # one-line DplError when not UTF-8
            # not splitlines(): it also splits at \x0b, \x1c, \x85, ..., which are refused
            lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
            names = [n.strip() for n in lines if n.strip()]
            return _checked_names(folder / "classes.txt", names)
    raise DplError(f"{src}: no class names found (add data.yaml or classes.txt, or pass --classes)")


def _parse_yolo_row(txt: Path, lineno: int, line: str) -> tuple[int, list[float], bool]:
    """(class index, [cx, cy, w, h] normalised, was a polygon) of one label row."""
    where = f"{txt}:{lineno}"
    try:
        values = [float(v) for v in line.split()]
    except ValueError:
        raise DplError(f"{where}: non-numeric value in '{line}'") from None
    if not all(math.isfinite(v) for v in values):
        raise DplError(f"{where}: non-finite value in '{line}'")
    if len(values) < 5 or values[0] != int(values[0]) or values[0] < 0:
        raise DplError(f"{where}: expected 'class cx cy w h' (class a non-negative integer)")
    cls, rest = int(values[0]), values[1:]
    if len(rest) >= 6 and len(rest) % 2 == 0:  # polygon x1 y1 x2 y2 ... (segmentation)
        xs, ys = rest[0::2], rest[1::2]
        x1, x2, y1, y2 = min(xs), max(xs), min(ys), max(ys)
        return cls, [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], True
    return cls, rest[:4], False  # a 6th value (a confidence) is ignored


def convert_yolo(
    src: str | Path,
    split: str | None = None,
    classes: list[str] | None = None,
    progress: bool = True,
    strict: bool = False,
) -> Conversion:
    """Convert a YOLO dataset (images/ + labels/, optional split subfolders, or txt beside
    images) using image sizes read from the image headers; a bad label file skips its
    image and is listed (``strict``: a DplError)."""
    src = Path(src)
    images_dir, labels_dir = _yolo_layout(src, split)
    names = classes or yolo_class_names(src, images_dir, labels_dir)
    report = ValidationReport(src)
    skips = _Skips(strict)
    raw_images: list[dict[str, Any]] = []
    raw_anns: list[dict[str, Any]] = []
    used_labels: set[Path] = set()
    scan = scan_images(images_dir)
    for entry, reason in scan.skipped:
        skips.add(entry, reason)
    for path in track(scan.files, description="reading YOLO", disable=not progress):
        rel = path.relative_to(images_dir)
        txt = labels_dir / rel.with_suffix(".txt")
        used_labels.add(txt)
        if not utf8_name(rel):
            skips.add(path, "file name is not valid UTF-8 (image skipped)")
            continue
        try:
            width, height = image_size(path)
        except ImageReadError as e:
            report.add("unreadable image (image dropped)", str(e))
            continue
        try:
            rows = _read_yolo_labels(txt)
        except DplError as e:
            skips.error(txt, e)
            continue
        image_id = len(raw_images) + 1
        raw_images.append(
            {"id": image_id, "file_name": rel.as_posix(), "width": width, "height": height}
        )
        for lineno, cls, (cx, cy, w, h), polygon in rows:
            if polygon:
                report.add("polygon row (converted to its bounding box)", f"{txt}:{lineno}")
            bbox = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
            raw_anns.append(
                {
                    "id": len(raw_anns) + 1,
                    "image_id": image_id,
                    "category_id": cls + 1,
                    "bbox": bbox,
                    "area": max(bbox[2], 0) * max(bbox[3], 0),
                    "iscrowd": 0,
                }
            )
    if not raw_images and not report.counts and not skips.files:
        raise DplError(f"{images_dir}: no images found")
    if labels_dir.is_dir():
        for txt in sorted(labels_dir.rglob("*.txt")):
            if txt not in used_labels and txt.name != "classes.txt":
                report.add("label file without an image (ignored)", str(txt))
    categories = [{"id": i + 1, "name": n, "supercategory": "none"} for i, n in enumerate(names)]
    raw = {"images": raw_images, "annotations": raw_anns, "categories": categories}
    coco = validate_coco(raw, src)
    report.merge(coco.report)
    coco.report = report
    return Conversion(coco, images_dir, skips.files, len(raw_anns))


def _read_yolo_labels(txt: Path) -> list[tuple[int, int, list[float], bool]]:
    """(line number, class, [cx, cy, w, h], polygon) of each row of a label file (none when
    it does not exist); a DplError naming the file and line for a bad file."""
    if not txt.is_file():
        return []
    text = read_text(txt)
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            rows.append((lineno, *_parse_yolo_row(txt, lineno, line)))
    return rows


# -------------------------------------------------------------------------- COCO


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
        raise DplError(
            f"{src}: all {result.input_boxes} boxes of the input were dropped, nothing written "
            "(see the problems above: wrong --classes? boxes outside the images?)"
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

    The set is not checked for being usable: see ``require_usable``.
    """
    if fmt == "voc":
        return convert_voc(src, split, classes, images_dir, skip_difficult, progress, strict)
    if fmt == "yolo":
        return convert_yolo(src, split, classes, progress, strict)
    if fmt == "coco":
        return convert_coco(src, images_dir, allow_outside_root)
    if fmt in REVIEW_FORMATS:
        return convert_review(fmt, src, classes, images_dir, allow_outside_root)
    raise DplError(f"unknown format '{fmt}' (choose from {', '.join(FORMATS)})")
