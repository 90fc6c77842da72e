"""Load and validate COCO detection JSON, with counted reporting of every problem.

Structural problems (unreadable JSON, missing keys, duplicate ids, images without a
positive width/height) are fatal ``DplError``s naming the file, with how many items are
affected and a first example. Per-annotation problems are repaired and counted:
zero/negative-size or malformed boxes and boxes of unknown images or categories are
dropped, boxes reaching outside their image are clipped. Missing image files (when an
image folder is given) drop the image (and its boxes) and are counted too.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpl_tools.errors import DplError
from dpl_tools.io import write_json

REQUIRED_KEYS = ("images", "categories")


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
    if not path.is_file():
        raise DplError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DplError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DplError(f"{path}: cannot read ({e})") from None


def _check_unique(path: Path, items: list[dict], what: str) -> None:
    counts = Counter(repr(item["id"]) for item in items)
    dups = [i for i, n in counts.items() if n > 1]
    if dups:
        raise DplError(
            f"{path}: {len(dups)} duplicate {what} id(s) (e.g. id {dups[0]} "
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


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _box(bbox: Any) -> tuple[float, float, float, float] | None:
    """The four finite numbers of a COCO bbox, or None when it is malformed."""
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
        return None
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return None
    return x, y, w, h


def validate_coco(
    raw: Any,
    path: str | Path,
    images_dir: str | Path | None = None,
    require_annotations: bool = True,
) -> CocoData:
    """Validate a parsed COCO dict; see the module docstring for what is fatal."""
    path = Path(path)
    if not isinstance(raw, dict):
        raise DplError(f"{path}: top level must be a JSON object with images/categories")
    keys = REQUIRED_KEYS + (("annotations",) if require_annotations else ())
    missing = [k for k in keys if k not in raw]
    if missing:
        raise DplError(f"{path}: missing top-level key(s) {', '.join(missing)}")
    report = ValidationReport(path)

    categories = _as_list(path, raw, "categories")
    _require(path, categories, ("id", "name"), "category")
    categories = [dict(c) for c in categories]
    _check_unique(path, categories, "category")

    images = _as_list(path, raw, "images")
    _require(path, images, ("id", "file_name", "width", "height"), "image")
    images = [dict(im) for im in images]
    _check_unique(path, images, "image")
    bad_size = [im for im in images if not (_positive(im["width"]) and _positive(im["height"]))]
    if bad_size:
        im = bad_size[0]
        raise DplError(
            f"{path}: {len(bad_size)} image(s) without a positive width/height "
            f"(e.g. image {im['id']} {im['file_name']}: {im['width']}x{im['height']})"
        )
    all_image_ids = {im["id"] for im in images}

    if images_dir is not None:
        images_dir = Path(images_dir)
        kept = []
        for im in images:
            if (images_dir / im["file_name"]).is_file():
                kept.append(im)
            else:
                report.add("missing image file (image dropped)", str(images_dir / im["file_name"]))
        images = kept

    image_by_id = {im["id"]: im for im in images}
    cat_ids = {c["id"] for c in categories}
    annotations = _as_list(path, raw, "annotations")
    _require(path, annotations, ("id", "image_id", "category_id", "bbox"), "annotation")
    annotations = [dict(a) for a in annotations]
    _check_unique(path, annotations, "annotation")

    kept_anns = []
    for a in annotations:
        ref = f"annotation {a['id']}"
        if a["image_id"] not in image_by_id:
            example = f"{ref}: image {a['image_id']}"
            if a["image_id"] in all_image_ids:
                report.add("annotation of a dropped image (dropped)", example)
            else:
                report.add("unknown image id (annotation dropped)", example)
            continue
        im = image_by_id[a["image_id"]]
        ref = f"annotation {a['id']} ({im['file_name']})"
        if a["category_id"] not in cat_ids:
            report.add("unknown category id (annotation dropped)", f"{ref}: {a['category_id']}")
            continue
        box = _box(a["bbox"])
        if box is None:
            report.add("malformed bbox (annotation dropped)", f"{ref}: {a['bbox']!r}")
            continue
        x, y, w, h = box
        if w <= 0 or h <= 0:
            report.add("zero or negative size box (dropped)", f"{ref}: {a['bbox']}")
            continue
        x1, y1 = max(x, 0.0), max(y, 0.0)
        x2, y2 = min(x + w, float(im["width"])), min(y + h, float(im["height"]))
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            if x2 <= x1 or y2 <= y1:
                report.add("box entirely outside its image (dropped)", f"{ref}: {a['bbox']}")
                continue
            report.add("box outside its image (clipped)", f"{ref}: {a['bbox']}")
            a["area"] = min(float(a.get("area", math.inf)), (x2 - x1) * (y2 - y1))
        a["bbox"] = [x1, y1, x2 - x1, y2 - y1]
        a.setdefault("area", (x2 - x1) * (y2 - y1))
        a.setdefault("iscrowd", 0)
        kept_anns.append(a)

    extra = {k: v for k, v in raw.items() if k not in ("images", "annotations", "categories")}
    return CocoData(path, images, kept_anns, categories, report, extra)


def load_coco(
    path: str | Path,
    images_dir: str | Path | None = None,
    require_annotations: bool = True,
) -> CocoData:
    """Read and validate a COCO detection JSON (see ``validate_coco``)."""
    return validate_coco(read_json(path), path, images_dir, require_annotations)


def save_coco(data: CocoData | dict[str, Any], path: str | Path) -> Path:
    """Write a COCO set (CocoData or plain dict) as JSON atomically; returns the path."""
    write_json(path, data.to_dict() if isinstance(data, CocoData) else data)
    return Path(path)
