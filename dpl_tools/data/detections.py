"""Detections of another labeler (any detector, a labeling service) read for polishing.

Two formats, told apart by the path:

* a COCO results file (a JSON list of ``{"image_id" or "file_name", "category_id",
  "bbox": [x, y, w, h], "score"}``, pixels; also accepted inside ``{"annotations": [...]}``);
  ``image_id`` is resolved against a COCO image list, ``file_name`` against any image list;
* a folder of YOLO txt files with a confidence column, one per image (``class cx cy w h
  conf``, normalised; ultralytics ``save_txt`` + ``save_conf``), matched to images by their
  path without suffix (or by file stem when that is unique).

Classes: by default a COCO ``category_id`` is a category id of dpl's categories and a YOLO
class is a 0-based index into them; with a classes file (``data.yaml`` ``names``,
``classes.txt`` one name a line, a YOLO folder's own ``classes.txt``, or a COCO JSON's
``categories``) they are the labeler's names, which must match dpl's category names after an
optional category map (``labeler name: dpl name``, ``null`` drops that class). Bad input
is one DplError naming the file and the record. The reader knows nothing of models: the same
``ExternalDetections`` serve polishing unlabeled images and (later) training the polishers on
the labeler's errors on labeled images.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from dpl_tools.data.coco import MIN_BOX_SIDE, as_int_id, read_json
from dpl_tools.errors import DplError
from dpl_tools.io import sha256_file
from dpl_tools.textfiles import parse_yaml, read_yaml_file

COCO_RESULTS = "coco-results"
YOLO_TXT = "yolo-txt"
_NORMALISED_SLACK = 0.01  # YOLO coordinates may overshoot 0..1 by this much (rounding)


@dataclass
class ImageDetections:
    """One image's detections: ``boxes`` [N, 4] (xyxy pixels, or cx cy w h in 0..1 when
    ``normalized``), ``scores`` [N] and ``category_ids`` [N] (dpl's COCO category ids)."""

    boxes: np.ndarray
    scores: np.ndarray
    category_ids: np.ndarray
    normalized: bool = False

    @classmethod
    def empty(cls) -> ImageDetections:
        return cls(np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64))

    def pixel_boxes(self, width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(xyxy boxes clipped to a ``width`` x ``height`` image, scores, category ids);
        boxes left thinner than ``MIN_BOX_SIDE`` px by the clipping are dropped."""
        b = self.boxes.astype(np.float64).reshape(-1, 4)
        if self.normalized:
            cx, cy, w, h = b[:, 0] * width, b[:, 1] * height, b[:, 2] * width, b[:, 3] * height
            b = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        b = np.clip(b, 0.0, [width, height, width, height])
        ok = (b[:, 2] - b[:, 0] >= MIN_BOX_SIDE) & (b[:, 3] - b[:, 1] >= MIN_BOX_SIDE)
        return b[ok], self.scores[ok].astype(np.float64), self.category_ids[ok]


@dataclass
class ExternalDetections:
    """A labeler's detections by image file name, plus ``source`` (the Parquet metadata
    form: format, file name, sha256, classes file, category map)."""

    source: dict[str, Any]
    by_file: dict[str, ImageDetections] = field(default_factory=dict)
    dropped_classes: int = 0  # detections of classes the category map maps to null

    def for_image(self, file_name: str) -> ImageDetections:
        """The detections of one image (none: the labeler found nothing there)."""
        return self.by_file.get(file_name) or ImageDetections.empty()

    @property
    def count(self) -> int:
        return sum(len(d.scores) for d in self.by_file.values())


class _Images:
    """Resolves a detection's image reference (id, file name, or label-file path)."""

    def __init__(self, records: Sequence[Mapping[str, Any]], option: str = "--images") -> None:
        self.option = option  # the option that gave the images, for messages
        self.names = {r["file_name"] for r in records}
        # Folder records are numbered by dpl (``numbered``): their ids mean nothing outside.
        self.by_id = {r["id"]: r["file_name"] for r in records if not r.get("numbered")}
        self.ids_usable = bool(self.by_id) or not records
        self.by_stem: dict[str, str | None] = {}
        self.by_base: dict[str, str | None] = {}
        for name in sorted(self.names):
            path = PurePosixPath(name)
            stem = str(path.with_suffix(""))
            self.by_stem[stem] = None if stem in self.by_stem else name
            base = path.name
            self.by_base[base] = None if base in self.by_base else name
        self.by_base_stem: dict[str, str | None] = {}
        for name in sorted(self.names):
            s = PurePosixPath(name).stem
            self.by_base_stem[s] = None if s in self.by_base_stem else name

    def file(self, name: str) -> str | None:
        """An image of the list by file name, or by base name when that is unique."""
        if name in self.names:
            return name
        return self.by_base.get(PurePosixPath(name).name)

    def label_file(self, rel: str) -> str | None:
        """The image of a YOLO label file (path without suffix, or a unique file stem)."""
        stem = str(PurePosixPath(rel).with_suffix(""))
        found = self.by_stem.get(stem)
        if found is None and "/" not in stem:
            found = self.by_base_stem.get(stem)
        return found


def read_classes(path: str | Path) -> dict[int, str]:
    """Labeler class names by class key: ``data.yaml`` ``names`` (list or mapping) or
    ``classes.txt`` (0-based index -> name), or a COCO JSON's categories (id -> name)."""
    path = Path(path)
    if not path.is_file():
        raise DplError(f"{path}: classes file not found")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DplError(f"{path}: not UTF-8 text") from None
    if suffix == ".json":
        raw = read_json(path)
        cats = raw.get("categories") if isinstance(raw, dict) else None
        if not isinstance(cats, list):
            raise DplError(f"{path}: a COCO JSON classes file needs a 'categories' list")
        out = {}
        for n, c in enumerate(cats):
            cid = as_int_id(c.get("id")) if isinstance(c, dict) else None
            if cid is None or not isinstance(c.get("name"), str):
                raise DplError(f"{path}: category #{n} needs an integer id and a name")
            out[cid] = c["name"]
        return out
    if suffix in (".yaml", ".yml"):
        raw = parse_yaml(text, path)  # one-line DplError: invalid YAML, alias bomb
        names = raw.get("names") if isinstance(raw, dict) else None
        if isinstance(names, list):
            names = dict(enumerate(names))
        if not isinstance(names, dict) or not all(
            as_int_id(k) is not None and isinstance(v, str) for k, v in names.items()
        ):
            raise DplError(f"{path}: needs 'names', a list of class names or {{index: name}}")
        return {as_int_id(k): v for k, v in names.items()}
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names or not all(names):
        raise DplError(f"{path}: expected one class name a line (no blank lines)")
    return dict(enumerate(names))


def read_category_map(path: str | Path) -> dict[str, str | None]:
    """A YAML/JSON mapping ``labeler name -> dpl category name`` (``null``: drop the class)."""
    path = Path(path)
    if not path.is_file():
        raise DplError(f"{path}: category map file not found")
    raw = read_yaml_file(path)  # JSON is YAML; one-line DplError: not UTF-8, alias bomb
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in raw.items()
    ):
        raise DplError(
            f"{path}: a category map is a mapping of labeler class name to dpl category name "
            "(or null to drop the class)"
        )
    return raw


def _folder_digest(files: Iterable[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


class _Classes:
    """Turns a labeler's class key into a dpl category id (or None: dropped by the map)."""

    def __init__(
        self,
        categories: Sequence[Mapping[str, Any]],
        keyed_by: str,
        names: dict[int, str] | None,
        category_map: dict[str, str | None] | None,
        where: str,
    ) -> None:
        self.dpl_by_name = {c["name"]: c["id"] for c in categories}
        if names is None:  # the labeler uses dpl's own classes
            if keyed_by == "index":
                names = {i: c["name"] for i, c in enumerate(categories)}
            else:
                names = {c["id"]: c["name"] for c in categories}
        self.names, self.map, self.where = names, category_map or {}, where
        self.used: dict[str, str] = {}  # labeler name -> first record using it
        self.keyed_by = keyed_by

    def resolve(self, key: int, record: str) -> str:
        """The labeler's name of class ``key`` (a one-line error naming ``record``)."""
        name = self.names.get(key)
        if name is None:
            what = "class index" if self.keyed_by == "index" else "category_id"
            raise DplError(
                f"{record}: unknown {what} {key} (the labeler's classes are "
                f"{', '.join(f'{k}: {v}' for k, v in sorted(self.names.items())[:10])}"
                f"{', ...' if len(self.names) > 10 else ''}; give its classes file)"
            )
        self.used.setdefault(name, record)
        return name

    def dpl_ids(self) -> dict[str, int | None]:
        """Labeler name -> dpl category id (None: dropped) for every name used, or a
        DplError naming every name that matches no dpl category."""
        out, missing = {}, []
        for name in self.used:
            target = self.map.get(name, name)
            if target is None:
                out[name] = None
            elif target in self.dpl_by_name:
                out[name] = self.dpl_by_name[target]
            else:
                missing.append(name if target == name else f"{name} (mapped to {target})")
        if missing:
            raise DplError(
                f"{self.where}: class name(s) {', '.join(missing)} are not among the polisher's "
                f"categories ({', '.join(self.dpl_by_name)}); rename them with --category-map "
                "(labeler name: dpl name, or null to drop)"
            )
        return out


def _finite(values: Sequence[Any]) -> bool:
    return all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )


def _coco_results(path: Path, images: _Images, classes: _Classes) -> dict[str, list]:
    raw = read_json(path)
    if isinstance(raw, dict) and isinstance(raw.get("annotations"), list):
        raw = raw["annotations"]
    if not isinstance(raw, list):
        raise DplError(f"{path}: not a COCO results file (a JSON list of detections)")
    rows: dict[str, list] = {}
    for n, det in enumerate(raw):
        record = f"{path}: detection #{n}"
        if not isinstance(det, dict):
            raise DplError(f"{record}: not a JSON object")
        if "image_id" in det and det["image_id"] is not None:
            image_id = as_int_id(det["image_id"])
            if image_id is None:
                raise DplError(
                    f"{record}: image_id {json.dumps(det['image_id'])} is not an integer"
                )
            if not images.ids_usable:
                raise DplError(
                    f"{record}: refers to image_id {image_id}, but --images is a folder (dpl "
                    "numbers its images itself): give a COCO JSON --images, or write file_name"
                )
            name = images.by_id.get(image_id)
            ref = f"image_id {image_id}"
        elif isinstance(det.get("file_name"), str):
            name, ref = images.file(det["file_name"]), f"file_name {det['file_name']!r}"
        else:
            raise DplError(f"{record}: needs an integer image_id or a file_name string")
        if name is None:
            raise DplError(
                f"{record}: unknown image ({ref} is not among the {images.option} images)"
            )
        record = f"{record} ({name})"
        bbox, score = det.get("bbox"), det.get("score")
        if not (isinstance(bbox, list) and len(bbox) == 4 and _finite(bbox)):
            raise DplError(f"{record}: bbox {json.dumps(bbox)} is not four finite numbers")
        if bbox[2] <= 0 or bbox[3] <= 0:
            raise DplError(f"{record}: bbox {json.dumps(bbox)} has no area (w and h must be > 0)")
        if not _finite([score]):
            raise DplError(f"{record}: score {json.dumps(score)} is not a finite number")
        key = as_int_id(det.get("category_id"))
        if key is None:
            raise DplError(
                f"{record}: category_id {json.dumps(det.get('category_id'))} is not an integer"
            )
        x, y, w, h = (float(v) for v in bbox)
        rows.setdefault(name, []).append(
            ([x, y, x + w, y + h], float(score), classes.resolve(key, record))
        )
    return rows


def _yolo_folder(
    folder: Path, images: _Images, classes: _Classes
) -> tuple[dict[str, list], list[Path]]:
    files = sorted(p for p in folder.rglob("*.txt") if p.is_file() and p != folder / "classes.txt")
    rows: dict[str, list] = {}
    for f in files:
        rel = f.relative_to(folder).as_posix()
        name = images.label_file(rel)
        if name is None:
            raise DplError(
                f"{f}: unknown image (no image of {images.option} is named like this label "
                "file, or several are)"
            )
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DplError(f"{f}: not UTF-8 text (byte offset {e.start})") from None
        for line_no, line in enumerate(text.splitlines(), start=1):
            record = f"{f}: line {line_no}"
            parts = line.split()
            if not parts:
                continue
            if len(parts) == 5:
                raise DplError(
                    f"{record}: no confidence column (expected 'class cx cy w h conf'; write "
                    "the predictions with save_conf=True)"
                )
            if len(parts) != 6:
                raise DplError(
                    f"{record}: expected 6 numbers 'class cx cy w h conf', got {len(parts)}"
                )
            try:
                values = [float(v) for v in parts]
            except ValueError:
                raise DplError(f"{record}: not a number in {line.strip()!r}") from None
            if not all(math.isfinite(v) for v in values):
                raise DplError(f"{record}: non-finite number in {line.strip()!r}")
            key = as_int_id(values[0])
            if key is None or key < 0:
                raise DplError(f"{record}: class {parts[0]!r} is not a 0-based class index")
            cx, cy, w, h, conf = values[1:]
            lo, hi = -_NORMALISED_SLACK, 1 + _NORMALISED_SLACK
            if not (lo <= cx <= hi and lo <= cy <= hi and 0 < w <= hi and 0 < h <= hi):
                raise DplError(
                    f"{record}: bad box {' '.join(parts[1:5])} (cx cy w h normalised to 0..1, "
                    "w and h > 0)"
                )
            rows.setdefault(name, []).append(([cx, cy, w, h], conf, classes.resolve(key, record)))
    return rows, files


def load_detections(
    path: str | Path,
    records: Sequence[Mapping[str, Any]],
    categories: Sequence[Mapping[str, Any]],
    classes_file: str | Path | None = None,
    category_map: str | Path | None = None,
    images_option: str = "--images",
) -> ExternalDetections:
    """Read a COCO results file or a YOLO txt folder (module docstring) for ``records``
    (image dicts with ``id`` and ``file_name``) and dpl's ``categories``; ``images_option``
    names the option that listed the images, for the unknown-image error."""
    path = Path(path)
    if not path.exists():
        raise DplError(f"{path}: detections file or folder not found")
    fmt = YOLO_TXT if path.is_dir() else COCO_RESULTS
    if classes_file is None and fmt == YOLO_TXT and (path / "classes.txt").is_file():
        classes_file = path / "classes.txt"
    names = read_classes(classes_file) if classes_file is not None else None
    mapping = read_category_map(category_map) if category_map is not None else None
    classes = _Classes(categories, "index" if fmt == YOLO_TXT else "id", names, mapping, str(path))
    images = _Images(records, images_option)
    if fmt == YOLO_TXT:
        rows, files = _yolo_folder(path, images, classes)
        digest = _folder_digest(files, path)
    else:
        rows, digest = _coco_results(path, images, classes), sha256_file(path)
    to_dpl = classes.dpl_ids()
    source: dict[str, Any] = {"source": "detections", "format": fmt, "file": path.name}
    source["sha256"] = digest
    if classes_file is not None:
        source["classes"] = {"file": Path(classes_file).name, "sha256": sha256_file(classes_file)}
    if mapping is not None:
        source["category_map"] = mapping
    out = ExternalDetections(source)
    for name, dets in rows.items():
        kept = [
            (box, score, to_dpl[label]) for box, score, label in dets if to_dpl[label] is not None
        ]
        out.dropped_classes += len(dets) - len(kept)
        if kept:
            out.by_file[name] = ImageDetections(
                np.array([k[0] for k in kept], dtype=np.float64).reshape(-1, 4),
                np.array([k[1] for k in kept], dtype=np.float64),
                np.array([k[2] for k in kept], dtype=np.int64),
                normalized=fmt == YOLO_TXT,
            )
    return out


TEACHER_BOXES: dict[str, Any] = {"source": "teacher"}  # the metadata of teacher-made boxes
