"""YOLO txt label folders to COCO (``dpl convert --format yolo``): rows ``class cx cy w
h`` normalised to the image (read from its header, EXIF rotation applied), polygon rows as
their bounding box, class ``k`` as category ``k + 1``, class names from ``data.yaml`` or
``classes.txt``. The other conventions are in ``dpl_tools.data.convert``'s docstring.
"""

from __future__ import annotations

import math
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
    ImageReadError,
    image_size,
    scan_images,
    utf8_name,
)
from dpl_tools.errors import DplError
from dpl_tools.textfiles import read_text, read_yaml_file


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
    if len(values) < 5:
        raise DplError(
            f"{where}: expected 'class cx cy w h': a box row needs 5 values, got "
            f"{len(values)} in '{line.strip()}'"
        )
    if values[0] != int(values[0]) or values[0] < 0:
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
    skips = Skips(strict)
    raw_images: list[dict[str, Any]] = []
    raw_anns: list[dict[str, Any]] = []
    used_labels: set[Path] = set()
    input_boxes = 0  # rows of every image's label file, those of skipped files included
    scan = scan_images(images_dir)
    for entry, reason in scan.skipped:
        skips.add(entry, reason)
    for path in track(scan.files, description="reading YOLO", disable=not progress):
        rel = path.relative_to(images_dir)
        txt = labels_dir / rel.with_suffix(".txt")
        used_labels.add(txt)
        if not utf8_name(rel):
            input_boxes += _row_count(txt)
            skips.add(path, "file name is not valid UTF-8 (image skipped)")
            continue
        try:
            width, height = image_size(path)
        except ImageReadError as e:
            input_boxes += _row_count(txt)
            report.add("unreadable image (image dropped)", str(e))
            continue
        try:
            rows = _read_yolo_labels(txt)
        except DplError as e:
            input_boxes += _row_count(txt)
            skips.error(txt, e)
            continue
        input_boxes += len(rows)
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
    return Conversion(coco, images_dir, skips.files, input_boxes)


def _row_count(txt: Path) -> int:
    """The box rows of a label file that was not parsed (a bad one, or that of a skipped
    image): its non-blank, non-comment lines, read as bytes so a file that is not UTF-8
    counts too; 0 when there is no file, 1 when it cannot be read (it may hold boxes)."""
    if not txt.is_file():
        return 0
    try:
        data = txt.read_bytes()
    except OSError:
        return 1
    return sum(1 for ln in data.splitlines() if ln.strip() and not ln.lstrip().startswith(b"#"))


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
