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
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dpl_tools.errors import DplError

BOX_COLUMNS = ("x1", "y1", "x2", "y2")

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
        ("use_cls", pa.bool_()),  # box is a classification pseudo label
        ("use_reg", pa.bool_()),  # box is a regression pseudo label
    ]
)

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
    """JSON-encode metadata values for a Parquet schema."""
    return {k.encode(): json.dumps(v).encode() for k, v in meta.items()}


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


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise DplError(f"{path}: directory holds no .parquet part files")
        return files
    if not path.is_file():
        raise DplError(f"{path}: pseudo-label file not found")
    return [path]


def read_pseudo_labels(path: str | Path) -> tuple[pa.Table, dict[str, Any]]:
    """Read a pseudo-label file or part-file directory: (table, decoded metadata)."""
    path = Path(path)
    tables, meta = [], {}
    for f in _files(path):
        try:
            t = pq.read_table(f)
        except (pa.ArrowInvalid, OSError) as e:
            raise DplError(f"{f}: not a readable Parquet file ({e})") from None
        missing = [n for n in SCHEMA.names if n not in t.column_names]
        if missing:
            raise DplError(f"{f}: not a dpl pseudo-label file (missing {', '.join(missing)})")
        meta = meta or decode_metadata(t.schema.metadata, f)
        try:
            tables.append(t.select(SCHEMA.names).cast(SCHEMA))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            raise DplError(f"{f}: pseudo-label columns of the wrong type ({e})") from None
    return pa.concat_tables(tables), meta


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
