"""Load and validate COCO detection JSON, with counted reporting of every problem.

Structural problems (unreadable JSON, missing keys, duplicate ids, duplicate image file
names or category names, ids that are not integers or do not fit in int64, file names that
are not strings, category names with control characters such as a newline, images without
a positive finite width/height, file names leaving the image folder, an ``iscrowd`` other
than 0 or 1) are fatal ``DplError``s naming the file, with how many items are affected and
a first example. Ids are normalised to ``int`` (``1.0`` is ``1``). ``iscrowd`` is absent
(read as 0), the integer 0 or 1, or JSON ``false`` / ``true`` (stored as 0 / 1, what
pycocotools makes of them); a string such as ``"0"`` or ``"yes"``, a null, or any other
number is refused, since dpl and pycocotools would read it differently or not at all.
Per-annotation problems are repaired and counted: zero/negative-size, sub-pixel
(< ``MIN_BOX_SIDE``), non-finite or malformed boxes and boxes of unknown images or
categories are dropped, boxes reaching outside their image are clipped.

With an image folder, each image file's header is read: a missing file drops the image
(and its boxes); a width/height that differs from the decoded (EXIF-upright) image is
repaired when the difference is explainable, else the image is dropped, all counted:

* a uniform resize (same aspect ratio, up to rounding): boxes are rescaled to the file;
* sides swapped by an EXIF rotation, the annotation matching the stored pixels: the boxes
  were drawn ignoring the rotation, so they are rotated with the image (and rescaled if
  the stored size differs uniformly too);
* anything else: the boxes' frame is unknown and the image is dropped.

Orientations that keep the sides (180 degree turn, mirrors) cannot be told apart from an
upright annotation and are taken as upright.
"""

from __future__ import annotations

import json
import math
import os
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpl_tools.data.image_sizes import BoxMap, fit_images_to_files
from dpl_tools.data.images import outside_root
from dpl_tools.errors import DplError
from dpl_tools.io import write_json

REQUIRED_KEYS = ("images", "categories")
# Boxes narrower or lower than this (px) are dropped: a detector cannot learn them, and
# in float32 they collapse to zero size, which torchvision rejects mid-training.
MIN_BOX_SIDE = 0.01
# Ids are stored as int64 (Parquet, tensors, numpy); larger ones are refused when read.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass
class ValidationReport:
    """What validation changed or found, by problem, for one annotation file."""

    path: Path
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, problem: str, example: str) -> None:
        self.counts[problem] += 1
        self.examples.setdefault(problem, example)

    def merge(self, other: ValidationReport) -> None:
        """Add another report's counts (and first examples) to this one."""
        for problem, n in other.counts.items():
            self.counts[problem] += n
            self.examples.setdefault(problem, other.examples[problem])

    @property
    def clean(self) -> bool:
        return not self.counts

    def lines(self) -> list[str]:
        """One human-readable line per problem: count, what was done, first example."""
        return [
            f"{self.path}: {n} x {problem} (e.g. {self.examples[problem]})"
            for problem, n in sorted(self.counts.items())
        ]


@dataclass
class CocoData:
    """A validated COCO detection set: plain COCO dicts plus contiguous label mapping.

    Detector labels are contiguous ``1..C`` in the order of ``categories`` (0 is
    background); ``label_to_cat`` / ``cat_to_label`` translate to COCO category ids.
    """

    path: Path
    images: list[dict[str, Any]]
    annotations: list[dict[str, Any]]
    categories: list[dict[str, Any]]
    report: ValidationReport
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def category_names(self) -> list[str]:
        return [c["name"] for c in self.categories]

    @property
    def cat_to_label(self) -> dict[int, int]:
        return {c["id"]: i + 1 for i, c in enumerate(self.categories)}

    @property
    def label_to_cat(self) -> dict[int, int]:
        return {i + 1: c["id"] for i, c in enumerate(self.categories)}

    def annotations_by_image(self) -> dict[int, list[dict[str, Any]]]:
        by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for ann in self.annotations:
            by_image[ann["image_id"]].append(ann)
        return by_image

    def truth_by_file(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each image's truth boxes (xyxy, float64) and category ids by file name, crowd
        regions left out: what pseudo labels of that file are scored against."""
        by_image = self.annotations_by_image()
        out = {}
        for im in self.images:
            anns = [a for a in by_image.get(im["id"], []) if not a.get("iscrowd")]
            boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
            labels = np.array([a["category_id"] for a in anns], np.int64)
            out[im["file_name"]] = (np.array(boxes, np.float64).reshape(-1, 4), labels)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The validated set as a COCO JSON-ready dict (extra top-level keys kept)."""
        return {
            **self.extra,
            "images": self.images,
            "annotations": self.annotations,
            "categories": self.categories,
        }


def read_json(path: str | Path) -> Any:
    """Parse a JSON file, turning every failure into a one-line DplError."""
    path = Path(path)
    if path.is_dir():
        raise DplError(f"{path}: is a directory, not a JSON file")
    if not path.is_file():
        raise DplError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DplError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    except UnicodeDecodeError as e:
        raise DplError(
            f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
        ) from None
    except RecursionError:
        raise DplError(f"{path}: JSON nested too deeply to read") from None
    except OSError as e:
        raise DplError(f"{path}: cannot read ({e.strerror or e})") from None


def same_file_name(name: Any) -> Any:
    """An image file name as the file it names: ``a.png``, ``./a.png`` and ``sub//a.png``
    alike (non-strings as they are)."""
    return os.path.normpath(name) if isinstance(name, str) and name else name


def _check_unique(path: Path, items: list[dict], what: str, key: str = "id") -> None:
    """One DplError when two ``items`` share ``key`` (an id, an image file_name (as the file
    it names), a category name), naming the first repeated value and how often it appears."""
    same = same_file_name if key == "file_name" else (lambda value: value)
    counts = Counter(repr(same(item[key])) for item in items)
    dups = [i for i, n in counts.items() if n > 1]
    if dups:
        raise DplError(
            f"{path}: {len(dups)} duplicate {what} {key}(s) (e.g. {key} {dups[0]} "
            f"appears {counts[dups[0]]} times)"
        )


def _require(path: Path, items: list, keys: tuple[str, ...], what: str) -> None:
    bad = [i for i, item in enumerate(items) if not isinstance(item, dict)]
    if bad:
        raise DplError(f"{path}: {len(bad)} {what}(s) are not JSON objects (e.g. {what} #{bad[0]})")
    missing = [(i, [k for k in keys if k not in item]) for i, item in enumerate(items)]
    missing = [(i, m) for i, m in missing if m]
    if missing:
        i, keys_missing = missing[0]
        raise DplError(
            f"{path}: {len(missing)} {what}(s) missing required key(s) "
            f"(e.g. {what} #{i} lacks {', '.join(keys_missing)})"
        )


def _as_list(path: Path, raw: dict, key: str) -> list:
    value = raw.get(key, [])
    if not isinstance(value, list):
        raise DplError(f"{path}: '{key}' must be a list, got {type(value).__name__}")
    return value


def positive_number(value: Any) -> bool:
    """A finite number above zero (not a bool, a string, NaN or Infinity)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        value = float(value)
    except OverflowError:  # a JSON integer too large for a float: not finite
        return False
    return math.isfinite(value) and value > 0


def in_int64(value: int) -> bool:
    """Whether an integer id fits in int64 (how Parquet, numpy and torch store ids)."""
    return INT64_MIN <= value <= INT64_MAX


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a category name, or None: a control character (a newline,
    tab, NUL, ...) or a line/paragraph separator would break one-name-a-line files
    (``classes.txt``) and one-line reports."""
    for ch in name:
        if unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            return f"contains a control character (U+{ord(ch):04X})"
    return None


def as_int_id(value: Any) -> int | None:
    """``value`` as an integer id (``3`` or ``3.0``), or None when it is not one (a string,
    ``3.5``, NaN, a bool, null, a list)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    return None


def _normalize_ids(path: Path, items: list[dict], keys: tuple[str, ...], what: str) -> None:
    """Make ``items[k]`` ints in place, or one DplError naming the first bad record."""
    for key in keys:
        bad = [(i, item[key]) for i, item in enumerate(items) if as_int_id(item[key]) is None]
        if bad:
            _refuse_ids(
                path,
                items,
                bad,
                key,
                what,
                f"a non-integer '{key}'",
                lambda v: f"{json.dumps(v)}, a {type(v).__name__}",
                "be integers",
            )
        for item in items:
            item[key] = as_int_id(item[key])
        big = [(i, item[key]) for i, item in enumerate(items) if not in_int64(item[key])]
        if big:
            _refuse_ids(path, items, big, key, what, f"'{key}' outside the 64-bit integer range",
                        str, "fit in int64")  # fmt: skip


def _refuse_ids(
    path: Path, items: list[dict], bad: list[tuple[int, Any]], key: str, what: str,
    problem: str, shown: Any, rule: str,
) -> None:  # fmt: skip
    """One DplError naming how many records have a bad ``key`` and the first of them."""
    i, value = bad[0]
    ident = items[i].get("id") if key != "id" else None
    record = f"{what} #{i}" + (f" (id {ident!r})" if ident is not None else "")
    raise DplError(
        f"{path}: {len(bad)} {what}(s) with {problem} (e.g. {record}: "
        f"{key} = {shown(value)}); ids must {rule}"
    )


def _size_problem(im: dict[str, Any]) -> str:
    """What is wrong with an image's width/height: a value that is not a number (a string
    "160" is named as one), else the two values (zero, negative, non-finite)."""
    kinds = {str: "a string", bool: "a boolean", list: "a list", dict: "an object"}
    for key in ("width", "height"):
        value = im[key]
        if value is None:
            return f"{key} is null, expected a number"
        if type(value) in kinds:
            return f"{key} {json.dumps(value)} is {kinds[type(value)]}, expected a number"
        if not isinstance(value, (int, float)):
            return f"{key} is a {type(value).__name__}, expected a number"
    return f"{im['width']}x{im['height']}"


def _check_file_names(path: Path, images: list[dict]) -> None:
    """Every file_name a non-empty string without NUL, or one DplError naming the first."""
    bad = [
        im
        for im in images
        if not isinstance(im["file_name"], str) or not im["file_name"] or "\0" in im["file_name"]
    ]
    if bad:
        im = bad[0]
        raise DplError(
            f"{path}: {len(bad)} image(s) whose file_name is not a file name (e.g. image "
            f"{im['id']}: file_name = {json.dumps(im['file_name'])}); it must be a non-empty "
            "string"
        )


def check_inside_root(
    path: Path, names: list[tuple[Any, str]], root: Path, allow_outside_root: bool
) -> None:
    """Refuse (one DplError) file names that leave ``root`` unless ``allow_outside_root``.

    ``names``: (image id or None, file_name) pairs; the first offender is named.
    """
    if allow_outside_root:
        return
    outside = [(image_id, name) for image_id, name in names if outside_root(name)]
    if outside:
        image_id, name = outside[0]
        record = f"image {image_id}: {name!r}" if image_id is not None else repr(name)
        raise DplError(
            f"{path}: {len(outside)} file name(s) outside the image folder {root} (e.g. "
            f"{record}); dpl reads images only under it unless --allow-outside-root"
        )


def _box(bbox: Any) -> tuple[float, float, float, float] | None:
    """The four numbers of a COCO bbox (maybe non-finite), or None when it is not four."""
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
        return None
    if any(isinstance(v, (bool, str)) for v in bbox):
        return None
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError, OverflowError):
        return None
    return x, y, w, h


def _too_small(x: float, y: float, w: float, h: float) -> bool:
    """Sub-``MIN_BOX_SIDE`` sides, or sides that vanish in float32 (far from the origin)."""
    if w < MIN_BOX_SIDE or h < MIN_BOX_SIDE:
        return True
    corners = np.array([x, y, x + w, y + h], dtype=np.float32)
    return not (corners[2] > corners[0] and corners[3] > corners[1])


def _checked_categories(path: Path, raw: dict) -> list[dict]:
    """The categories, ids normalised; bad or duplicate ids and names are fatal."""
    categories = _as_list(path, raw, "categories")
    _require(path, categories, ("id", "name"), "category")
    categories = [dict(c) for c in categories]
    _normalize_ids(path, categories, ("id",), "category")
    bad_names = [c for c in categories if not isinstance(c["name"], str) or not c["name"]]
    if bad_names:
        c = bad_names[0]
        raise DplError(
            f"{path}: {len(bad_names)} category(s) whose name is not a non-empty string "
            f"(e.g. category {c['id']}: name = {json.dumps(c['name'])})"
        )
    bad_chars = [(c, name_problem(c["name"])) for c in categories if name_problem(c["name"])]
    if bad_chars:
        c, problem = bad_chars[0]
        raise DplError(
            f"{path}: {len(bad_chars)} category name(s) with a control character (e.g. "
            f"category {c['id']}: name {json.dumps(c['name'])} {problem})"
        )
    _check_unique(path, categories, "category")
    _check_unique(path, categories, "category", "name")
    return categories


def _checked_images(path: Path, raw: dict) -> list[dict]:
    """The images, ids normalised; bad ids, file names or sizes are fatal."""
    images = _as_list(path, raw, "images")
    _require(path, images, ("id", "file_name", "width", "height"), "image")
    images = [dict(im) for im in images]
    _normalize_ids(path, images, ("id",), "image")
    _check_file_names(path, images)
    _check_unique(path, images, "image")
    _check_unique(path, images, "image", "file_name")
    bad_size = [
        im for im in images if not (positive_number(im["width"]) and positive_number(im["height"]))
    ]
    if bad_size:
        im = bad_size[0]
        raise DplError(
            f"{path}: {len(bad_size)} image(s) without a positive width/height "
            f"(e.g. image {im['id']} {im['file_name']}: {_size_problem(im)})"
        )
    return images


def _check_iscrowd(path: Path, annotations: list[dict]) -> None:
    """Make each annotation's ``iscrowd`` 0 or 1 in place (absent stays absent, JSON
    false/true become 0/1), or one DplError naming the first annotation with another value."""
    bad = []
    for a in annotations:
        if "iscrowd" not in a:
            continue
        value = a["iscrowd"]
        if isinstance(value, bool):
            a["iscrowd"] = int(value)
        elif type(value) is not int or value not in (0, 1):
            bad.append(a)
    if bad:
        a = bad[0]
        raise DplError(
            f"{path}: {len(bad)} annotation(s) with an invalid iscrowd (e.g. annotation "
            f"{a['id']}: iscrowd = {json.dumps(a['iscrowd'])}); it must be 0 or 1 (JSON "
            "false/true read as 0/1), or absent"
        )


def _repaired_box(
    a: dict, im: dict, box_map: BoxMap | None, report: ValidationReport
) -> dict | None:
    """Annotation ``a`` of image ``im`` with its box in the image's frame (mapped by
    ``box_map``, clipped), or None when it must be dropped; every repair is counted."""
    ref = f"annotation {a['id']} ({im['file_name']})"
    box = _box(a["bbox"])
    if box is None or not all(math.isfinite(v) for v in box):  # NaN/Infinity rejected
        report.add("malformed bbox (annotation dropped)", f"{ref}: {a['bbox']!r}")
        return None
    x, y, w, h = box
    if w <= 0 or h <= 0:
        report.add("zero or negative size box (dropped)", f"{ref}: {a['bbox']}")
        return None
    area = a.get("area")
    if "area" in a and not positive_number(area):
        report.add("missing or invalid area (recomputed)", f"{ref}: area = {area!r}")
        del a["area"]
    if box_map is not None:
        x, y, w, h = box_map(x, y, w, h)
        a.pop("area", None)
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, float(im["width"])), min(y + h, float(im["height"]))
    clipped = (x1, y1, x2, y2) != (x, y, x + w, y + h)
    if clipped and (x2 <= x1 or y2 <= y1):
        report.add("box entirely outside its image (dropped)", f"{ref}: {a['bbox']}")
        return None
    if _too_small(x1, y1, x2 - x1, y2 - y1):
        report.add(f"box smaller than {MIN_BOX_SIDE} px (dropped)", f"{ref}: {a['bbox']}")
        return None
    if clipped:
        report.add("box outside its image (clipped)", f"{ref}: {a['bbox']}")
        a["area"] = min(float(a.get("area", math.inf)), (x2 - x1) * (y2 - y1))
    a["bbox"] = [x1, y1, x2 - x1, y2 - y1]
    a.setdefault("area", (x2 - x1) * (y2 - y1))
    a.setdefault("iscrowd", 0)
    return a


def validate_coco(
    raw: Any,
    path: str | Path,
    images_dir: str | Path | None = None,
    require_annotations: bool = True,
    allow_outside_root: bool = False,
) -> CocoData:
    """Validate a parsed COCO dict; see the module docstring for what is fatal.

    With ``images_dir``, file names must stay inside it unless ``allow_outside_root``.
    """
    path = Path(path)
    if not isinstance(raw, dict):
        raise DplError(f"{path}: top level must be a JSON object with images/categories")
    keys = REQUIRED_KEYS + (("annotations",) if require_annotations else ())
    missing = [k for k in keys if k not in raw]
    if missing:
        raise DplError(f"{path}: missing top-level key(s) {', '.join(missing)}")
    report = ValidationReport(path)
    categories = _checked_categories(path, raw)
    images = _checked_images(path, raw)
    all_image_ids = {im["id"] for im in images}
    box_maps: dict[int, BoxMap] = {}
    if images_dir is not None:
        images_dir = Path(images_dir)
        check_inside_root(
            path, [(im["id"], im["file_name"]) for im in images], images_dir, allow_outside_root
        )
        images, box_maps = fit_images_to_files(images, images_dir, report)

    image_by_id = {im["id"]: im for im in images}
    cat_ids = {c["id"] for c in categories}
    annotations = _as_list(path, raw, "annotations")
    _require(path, annotations, ("id", "image_id", "category_id", "bbox"), "annotation")
    annotations = [dict(a) for a in annotations]
    _normalize_ids(path, annotations, ("id", "image_id", "category_id"), "annotation")
    _check_unique(path, annotations, "annotation")
    _check_iscrowd(path, annotations)
    kept_anns = []
    for a in annotations:
        if a["image_id"] not in image_by_id:
            example = f"annotation {a['id']}: image {a['image_id']}"
            if a["image_id"] in all_image_ids:
                report.add("annotation of a dropped image (dropped)", example)
            else:
                report.add("unknown image id (annotation dropped)", example)
            continue
        im = image_by_id[a["image_id"]]
        if a["category_id"] not in cat_ids:
            ref = f"annotation {a['id']} ({im['file_name']})"
            report.add("unknown category id (annotation dropped)", f"{ref}: {a['category_id']}")
            continue
        kept = _repaired_box(a, im, box_maps.get(im["id"]), report)
        if kept is not None:
            kept_anns.append(kept)

    extra = {k: v for k, v in raw.items() if k not in ("images", "annotations", "categories")}
    return CocoData(path, images, kept_anns, categories, report, extra)


def load_coco(
    path: str | Path,
    images_dir: str | Path | None = None,
    require_annotations: bool = True,
    allow_outside_root: bool = False,
) -> CocoData:
    """Read and validate a COCO detection JSON (see ``validate_coco``)."""
    raw = read_json(path)
    return validate_coco(raw, path, images_dir, require_annotations, allow_outside_root)


def save_coco(data: CocoData | dict[str, Any], path: str | Path) -> Path:
    """Write a COCO set (CocoData or plain dict) as JSON atomically; returns the path."""
    write_json(path, data.to_dict() if isinstance(data, CocoData) else data)
    return Path(path)
