"""Opening dpl's own Parquet files (noise pairs, cross-fitted detections) with one check.

Each file kind names its required columns and, where it has one, the metadata key that holds
its JSON description. A file that is missing, not Parquet, lacks a column or carries bad
metadata gives one line naming the file, never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dpl_tools.errors import DplError


def open_dpl_parquet(
    path: str | Path,
    kind: str,
    columns: tuple[str, ...] | list[str],
    meta_key: bytes | None = None,
    hint: str = "",
) -> tuple[pa.Schema, dict[str, Any]]:
    """``(schema, metadata)`` of a dpl Parquet file of ``kind`` (e.g. "noise file"), after
    checking it exists, is Parquet, holds ``columns`` and, with ``meta_key``, carries a JSON
    object under that key (``{}`` without one). ``hint`` says how to make such a file."""
    path = Path(path)
    made = f" ({hint})" if hint else ""
    if not path.is_file():
        raise DplError(f"{path}: {kind} not found{made}")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise DplError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    missing = [c for c in columns if c not in schema.names]
    raw = (schema.metadata or {}).get(meta_key) if meta_key else b"{}"
    if missing or raw is None:
        why = f"missing column(s) {', '.join(missing)}" if missing else "no dpl metadata"
        raise DplError(f"{path}: not a dpl {kind} ({why}){made}")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        key = meta_key.decode() if meta_key else ""
        raise DplError(f"{path}: Parquet metadata {key} is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DplError(f"{path}: Parquet metadata {meta_key!r} must be a JSON object")
    return schema, meta
