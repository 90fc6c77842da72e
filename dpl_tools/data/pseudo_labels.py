"""The pseudo-label Parquet format written by ``dpl polish`` and read by later stages.

One row per teacher box kept at the initial score threshold, holding both the raw
(teacher) and the polished view so users can audit and re-threshold without rerunning
models. An image with no kept box still has one row (box fields null) so "looked at and
found nothing" differs from "not processed"; an image that could not be decoded has one
row with ``status = "skipped"`` and the reason in ``error``. Labels are COCO category ids.
A directory of part files (``part-*.parquet``, from sharded runs) reads as one dataset.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dpl_tools.data.pseudo_views import BOX_COORDS
from dpl_tools.errors import DplError
from dpl_tools.io import json_text

BOX_COLUMNS = BOX_COORDS  # the pseudo-label columns of a box (same names everywhere)

SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("status", pa.string()),  # "ok" or "skipped"
        ("error", pa.string()),  # reason an image was skipped, else null
        *[(f"teacher_{c}", pa.float32()) for c in BOX_COLUMNS],
        ("teacher_label", pa.int32()),
        ("teacher_score", pa.float32()),
        *[(f"polished_{c}", pa.float32()) for c in BOX_COLUMNS],
        ("polished_label", pa.int32()),
        ("polisher_prob", pa.float32()),  # classification polisher's best foreground prob
        ("polisher_label", pa.int32()),  # its class (null without a polisher): re-thresholding
        ("use_cls", pa.bool_()),  # box is a classification pseudo label
        ("use_reg", pa.bool_()),  # box is a regression pseudo label
    ]
)

# Columns that files of earlier dpl versions lack (read as nulls).
OPTIONAL_COLUMNS = ("polisher_label",)

# Keys of the file's key-value metadata (values are JSON strings).
META_CATEGORIES = "dpl.categories"  # [{"id": 1, "name": "..."}, ...]
META_THRESHOLDS = "dpl.thresholds"  # {"initial": 0.5, "cls_prob": 0.9, "teacher_score": 0.9, ...}
META_TEACHER = "dpl.teacher_sha256"
META_POLISHER = "dpl.polisher_sha256"
META_VERSION = "dpl.version"
# Where the boxes came from: {"source": "teacher"} or {"source": "detections", "format": ..,
# "file": .., "sha256": ..} (another labeler's detections, dpl_tools.data.detections).
META_BOXES = "dpl.boxes"
# The polisher's fitted keep thresholds (``FittedThresholds.to_dict()``) or null.
META_FITTED = "dpl.fitted_thresholds"
# The polisher's check of its regression on real held-out pairs
# (``engine.regression_check.check_regression``) or null.
META_REGRESSION = "dpl.regression_check"
# Text entries of META_THRESHOLDS (the others are numbers): the keep rule, where each
# keep threshold came from (fitted / fallback / paper / user), where the rule came from as a
# whole (``keep_rule_source``: fitted, "fallback keep_all (why)", paper or user) and where
# ``reg_steps`` came from (user, or the regression check's choice and why).
THRESHOLD_TEXT_KEYS = (
    "keep_rule",
    "cls_prob_source",
    "teacher_score_source",
    "keep_rule_source",
    "reg_steps_source",
)


def encode_metadata(meta: dict[str, Any]) -> dict[bytes, bytes]:
    """JSON-encode metadata values for a Parquet schema (strict JSON: ``json_text``)."""
    return {k.encode(): json_text(v).encode() for k, v in meta.items()}


def _check_meta_value(key: str, value: Any) -> str | None:
    """What is wrong with a known key's decoded value, or None when it is well-formed."""
    if key == META_CATEGORIES:
        ok = isinstance(value, list) and all(
            isinstance(c, dict)
            and isinstance(c.get("id"), int)
            and not isinstance(c.get("id"), bool)
            and isinstance(c.get("name"), str)
            for c in value
        )
        return None if ok else 'must be a list of {"id": <int>, "name": <str>}'
    if key == META_THRESHOLDS:
        ok = isinstance(value, dict) and all(
            isinstance(v, str)
            if k in THRESHOLD_TEXT_KEYS
            else isinstance(v, (int, float)) and not isinstance(v, bool)
            for k, v in value.items()
        )
        return None if ok else "must be an object of numbers"
    if key in (META_FITTED, META_REGRESSION):
        return None if value is None or isinstance(value, dict) else "must be an object or null"
    if key == META_BOXES:
        ok = isinstance(value, dict) and isinstance(value.get("source"), str)
        return None if ok else 'must be an object with a "source" string'
    if key in (META_TEACHER, META_POLISHER, META_VERSION):
        return None if value is None or isinstance(value, str) else "must be a string"
    return None


def decode_metadata(raw: dict[bytes, bytes] | None, source: str | Path = "") -> dict[str, Any]:
    """Inverse of ``encode_metadata``; keys other than ``dpl.*`` are ignored. A malformed
    ``dpl.*`` value (not JSON, or the wrong shape) is a DplError naming ``source``."""
    out: dict[str, Any] = {}
    where = f"{source}: " if source else ""
    for k, v in (raw or {}).items():
        key = k.decode("utf-8", "replace")
        if not key.startswith("dpl."):
            continue
        try:
            value = json.loads(v.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise DplError(
                f"{where}Parquet metadata key {key!r} does not hold valid JSON ({e}); "
                "the file was not written by dpl polish or was altered"
            ) from None
        problem = _check_meta_value(key, value)
        if problem:
            raise DplError(f"{where}Parquet metadata key {key!r} {problem}, got {v[:80]!r}")
        out[key] = value
    return out


# Metadata that must match for a rerun to resume or reuse earlier output, and across the
# part files of one output (one teacher, polisher, keep rule and label set).
FINGERPRINT_KEYS = (META_CATEGORIES, META_THRESHOLDS, META_TEACHER, META_POLISHER, META_BOXES)
# Files written before a key existed hold what it then meant: teacher boxes.
_FINGERPRINT_DEFAULTS = {META_BOXES: {"source": "teacher"}}


def fingerprint(meta: dict[str, Any]) -> dict[str, Any]:
    """The metadata that says which run wrote a pseudo-label file (``FINGERPRINT_KEYS``)."""
    return {k: meta.get(k, _FINGERPRINT_DEFAULTS.get(k)) for k in FINGERPRINT_KEYS}


def fingerprint_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The fingerprint keys (without "dpl.") in which metadata ``a`` and ``b`` differ."""
    a, b = fingerprint(a), fingerprint(b)
    return [k.removeprefix("dpl.") for k in FINGERPRINT_KEYS if a[k] != b[k]]


PART_FILE = re.compile(r"part-(\d+)-of-(\d+)\.parquet")  # pseudo_label_writer.part_name


def shard_of_part(path: Path) -> tuple[int, int]:
    """(index, count) of a ``part-I-of-N.parquet`` file; (0, 1) for any other file."""
    match = PART_FILE.fullmatch(Path(path).name)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 1)


def part_counts(folder: Path) -> set[int]:
    """The shard counts N of the ``part-I-of-N.parquet`` files in ``folder``."""
    names = (PART_FILE.fullmatch(f.name) for f in folder.glob("part-*.parquet"))
    return {int(m.group(2)) for m in names if m}


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise DplError(f"{path}: directory holds no .parquet part files")
        counts = part_counts(path)
        if len(counts) > 1:
            raise DplError(
                f"{path}: part files of runs with different shard counts "
                f"({', '.join(map(str, sorted(counts)))}) would label the same images twice; "
                "keep one run's parts"
            )
        return files
    if not path.is_file():
        raise DplError(f"{path}: pseudo-label file not found")
    return [path]


def read_pseudo_labels(path: str | Path) -> tuple[pa.Table, dict[str, Any]]:
    """Read a pseudo-label file or part-file directory: (table, decoded metadata)."""
    path = Path(path)
    tables, meta, tables_from = [], {}, ""
    for f in _files(path):
        try:
            t = pq.read_table(f)
        except (pa.ArrowInvalid, OSError) as e:
            raise DplError(f"{f}: not a readable Parquet file ({e})") from None
        missing = [n for n in SCHEMA.names if n not in t.column_names]
        if missing and set(missing) <= set(OPTIONAL_COLUMNS):  # an older file: all nulls
            for name in missing:
                t = t.append_column(name, pa.nulls(t.num_rows, SCHEMA.field(name).type))
        elif missing:
            raise DplError(f"{f}: not a dpl pseudo-label file (missing {', '.join(missing)})")
        part_meta = decode_metadata(t.schema.metadata, f)
        differ = fingerprint_differences(part_meta, meta) if meta else []
        if differ:
            raise DplError(
                f"{f}: written by another run than {tables_from} (its {', '.join(differ)} "
                "differ): the parts of one output come from one teacher, polisher and keep rule"
            )
        if not meta:
            meta, tables_from = part_meta, f.name
        try:
            tables.append(t.select(SCHEMA.names).cast(SCHEMA))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            raise DplError(f"{f}: pseudo-label columns of the wrong type ({e})") from None
    table = pa.concat_tables(tables)
    if len(tables) > 1:
        _check_one_part_per_image(tables, path)
    check_images(table, path)
    return table, meta


def _check_one_part_per_image(tables: list[pa.Table], path: Path) -> None:
    """Refuse part files that hold the same image (by file name): two runs' parts."""
    seen: set[str] = set()
    for t in tables:
        names = set(pc.unique(t.column("file_name")).to_pylist())
        twice = names & seen
        if twice:
            raise DplError(
                f"{path}: image {sorted(twice)[0]!r} is in more than one part file (parts of "
                "two runs?); keep one run's parts"
            )
        seen |= names


ALTERED = "the file was not written by dpl polish or was altered"


def check_images(table: pa.Table, source: str | Path) -> None:
    """Refuse (one-line DplError naming ``source``) a table whose processed images hold no
    positive width and height, or whose image ids do not name one image each (two file
    names under one ``image_id``: their boxes would be merged by every reader keyed by id;
    one file name under two ``image_id``s: a reader keyed by name merges its boxes, one
    keyed by id finds boxes of an image id that names no image)."""
    ok = table.filter(pc.equal(table["status"], "ok"))
    bad_size = pc.or_kleene(
        pc.or_kleene(pc.is_null(ok["width"]), pc.is_null(ok["height"])),
        pc.or_kleene(pc.less_equal(ok["width"], 0), pc.less_equal(ok["height"], 0)),
    )
    bad = ok.filter(bad_size.fill_null(True))
    if bad.num_rows:
        r = bad.slice(0, 1).to_pylist()[0]
        raise DplError(
            f"{source}: image {r['file_name']!r} has size {r['width']}x{r['height']} (width and "
            f"height must be positive); {ALTERED}"
        )
    pairs = table.filter(pc.is_valid(table["image_id"])).select(["image_id", "file_name"])
    names = pairs.group_by(["image_id", "file_name"]).aggregate([])
    per_id = names.group_by("image_id").aggregate([("file_name", "count_distinct")])
    shared = per_id.filter(pc.greater(per_id["file_name_count_distinct"], 1))
    if shared.num_rows:
        image_id = shared["image_id"][0].as_py()
        files = names.filter(pc.equal(names["image_id"], image_id))["file_name"].to_pylist()
        two = ", ".join(repr(n) for n in sorted(files, key=str)[:2])
        raise DplError(
            f"{source}: image_id {image_id} is given to {len(files)} file names ({two}); each "
            f"image needs its own id, so its boxes cannot be told apart; {ALTERED}"
        )
    named = names.filter(pc.is_valid(names["file_name"]))
    per_name = named.group_by("file_name").aggregate([("image_id", "count_distinct")])
    split = per_name.filter(pc.greater(per_name["image_id_count_distinct"], 1))
    if split.num_rows:
        name = split["file_name"][0].as_py()
        ids = sorted(named.filter(pc.equal(named["file_name"], name))["image_id"].to_pylist())
        more = f" and {len(ids) - 2} more" if len(ids) > 2 else ""
        listed = f"{ids[0]}, {ids[1]}{more}" if more else f"{ids[0]} and {ids[1]}"
        raise DplError(
            f"{source}: file_name {name!r} appears under {len(ids)} image_ids ({listed}); "
            "each image needs one id, or its boxes are split between ids of which only one "
            f"names the image; {ALTERED}"
        )


def usable_boxes(boxes: np.ndarray, width, height) -> tuple[np.ndarray, np.ndarray]:
    """The one rule for usable pseudo-label boxes, shared by every reader (the student's
    targets, ``dpl_tools.models.student_criterion``, included): ``boxes`` (N, 4) xyxy pixels
    clipped to their image (``width`` / ``height``: numbers, or one per box), and whether
    each box is usable: finite, and neither inverted nor empty after clipping."""
    b = np.asarray(boxes).reshape(-1, 4)
    if b.dtype.kind != "f":
        b = b.astype(np.float64)
    n = len(b)
    w = np.broadcast_to(np.asarray(width, dtype=b.dtype), (n,))[:, None]
    h = np.broadcast_to(np.asarray(height, dtype=b.dtype), (n,))[:, None]
    clipped = b.copy()
    clipped[:, 0::2] = np.minimum(np.maximum(clipped[:, 0::2], 0), w)
    clipped[:, 1::2] = np.minimum(np.maximum(clipped[:, 1::2], 0), h)
    usable = (
        np.isfinite(b).all(axis=1)
        & (clipped[:, 2] > clipped[:, 0])
        & (clipped[:, 3] > clipped[:, 1])
    )
    return clipped, usable


# the per-box fields of a row: nulled when the row is dropped as unusable
BOX_FIELDS = (
    *[f"teacher_{c}" for c in BOX_COLUMNS],
    "teacher_label",
    "teacher_score",
    *[f"polished_{c}" for c in BOX_COLUMNS],
    "polished_label",
    "polisher_prob",
    "polisher_label",
    "use_cls",
    "use_reg",
)
UNUSABLE = "non-finite, inverted or empty box after clipping to the image, or no label"


def _numbers(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table[name].to_numpy(zero_copy_only=False), dtype=np.float64)


def box_rows(table: pa.Table) -> np.ndarray:
    """Rows of processed images that hold a teacher box (any teacher coordinate or label)."""
    teacher = [f"teacher_{c}" for c in BOX_COLUMNS] + ["teacher_label"]
    has = np.zeros(table.num_rows, bool)
    for name in teacher:
        has |= table[name].is_valid().to_numpy(zero_copy_only=False)
    return has & pc.equal(table["status"], "ok").fill_null(False).to_numpy(zero_copy_only=False)


def unusable_rows(
    table: pa.Table,
    boxes: tuple[str, ...] = ("teacher", "polished"),
    labels: tuple[str, ...] = ("teacher_label", "polished_label"),
) -> np.ndarray:
    """Rows holding a teacher box that a reader must drop (``usable_boxes``): any of the
    ``boxes`` prefixes' box unusable, or any of the ``labels`` columns missing."""
    rows = box_rows(table)
    width, height = _numbers(table, "width"), _numbers(table, "height")
    bad = np.zeros(table.num_rows, bool)
    for prefix in boxes:
        xyxy = np.stack([_numbers(table, f"{prefix}_{c}") for c in BOX_COLUMNS], axis=1)
        bad |= ~usable_boxes(xyxy, width, height)[1]
    for name in labels:
        bad |= table[name].is_null().to_numpy(zero_copy_only=False)
    return rows & bad


def drop_unusable_rows(
    table: pa.Table,
    boxes: tuple[str, ...] = ("teacher", "polished"),
    labels: tuple[str, ...] = ("teacher_label", "polished_label"),
) -> tuple[pa.Table, int]:
    """The table with its ``unusable_rows`` made box-less (their ``BOX_FIELDS`` nulled: the
    image stays processed, as one whose box was not kept), and how many there were."""
    bad = unusable_rows(table, boxes, labels)
    n = int(bad.sum())
    if not n:
        return table, 0
    mask = pa.array(bad)
    columns = [
        pc.if_else(mask, pa.scalar(None, table.schema.field(name).type), table[name])
        if name in BOX_FIELDS
        else table[name]
        for name in table.column_names
    ]
    return pa.Table.from_arrays(columns, schema=table.schema), n


def dropped_warning(source: str | Path, dropped: int) -> str:
    """The one warning line of a reader that dropped unusable rows."""
    return f"{source}: {dropped} pseudo-label row(s) dropped ({UNUSABLE})"


def pseudo_label_sources(labels: Path) -> dict[str, float | str | None]:
    """The kept fraction of a polish output and where its keep rule and regression pseudo
    labels came from (fitted or a fallback, and why): what a run's summary shows."""
    table, meta = read_pseudo_labels(labels)
    boxes = table.filter(pc.is_valid(table["teacher_score"]))
    kept = int(pc.sum(boxes["use_cls"]).as_py() or 0)
    thresholds = meta.get(META_THRESHOLDS, {})
    return {
        "pseudo_kept_fraction": kept / boxes.num_rows if boxes.num_rows else None,
        "keep_rule_source": thresholds.get("keep_rule_source", "n/a"),
        "reg_steps_source": thresholds.get("reg_steps_source", "n/a"),
    }
