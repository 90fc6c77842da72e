"""Pascal VOC XML folders to COCO (``dpl convert --format voc``).

VOC pixel coordinates are 1-based and inclusive (the VOC devkit convention), so a box
``xmin..xmax`` becomes COCO ``x = xmin - 1``, ``w = xmax - xmin + 1`` (same for y); an
empty drag (``xmax <= xmin``) keeps its zero or negative size so validation drops it.
``difficult`` objects are kept and marked (``skip_difficult`` drops them). The other
conventions are in ``dpl_tools.data.convert``'s docstring.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.progress import track

from dpl_tools.data.coco import (
    ValidationReport,
    name_problem,
    validate_coco,
)
from dpl_tools.data.conversion import Conversion, Skips
from dpl_tools.data.images import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    image_size,
)
from dpl_tools.errors import DplError
from dpl_tools.textfiles import read_text


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


def _xml_files(xml_dir: Path, root: Path, split: str | None, report: ValidationReport
               ) -> list[Path]:  # fmt: skip
    """The XML files to read: those of the ``split`` list (a listed id without XML is
    counted), else every XML of the folder; none is a DplError."""
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
    return xml_paths


def _annotation(obj: VocObject, ann_id: int, image_id: int, category_id: int) -> dict[str, Any]:
    """A VOC object as a COCO annotation (``difficult`` ones marked)."""
    bbox = voc_box_to_coco(obj.xmin, obj.ymin, obj.xmax, obj.ymax)
    ann = {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
           "area": max(bbox[2], 0) * max(bbox[3], 0), "iscrowd": 0}  # fmt: skip
    if obj.difficult:
        ann["difficult"] = 1
    return ann


def _object_count(xml: Path) -> int:
    """The ``<object>`` elements of an XML file that could not be parsed, counted in its
    bytes; 1 when it cannot be read (it may hold boxes)."""
    try:
        data = xml.read_bytes()
    except OSError:
        return 1
    return len(re.findall(rb"<object[\s>]", data))


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
    xml_paths = _xml_files(xml_dir, root, split, report)

    skips = Skips(strict)
    records = []
    unparsed_boxes = 0  # the objects of skipped XML files count as input boxes too
    for p in track(xml_paths, description="reading VOC XML", disable=not progress):
        try:
            records.append(parse_voc_xml(p))
        except DplError as e:
            skips.error(p, e)
            unparsed_boxes += _object_count(p)
    input_boxes = unparsed_boxes + sum(len(r.objects) for r in records)
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
            elif obj.difficult and skip_difficult:
                report.add("difficult object (dropped)", str(rec.xml_path))
            else:
                raw_anns.append(_annotation(obj, len(raw_anns) + 1, image_id, cat_id[obj.name]))
    categories = [{"id": i + 1, "name": n, "supercategory": "none"} for i, n in enumerate(names)]
    raw = {"images": raw_images, "annotations": raw_anns, "categories": categories}
    coco = validate_coco(raw, src, images)
    report.merge(coco.report)
    coco.report = report
    return Conversion(coco, images, skips.files, input_boxes)
