"""Crash-safe, resumable, sharded writing of pseudo-label Parquet files.

Each batch of images is written as its own small Parquet chunk (tmp file + rename, so a
chunk is either whole or absent) in a hidden staging folder beside the output,
``.<name>.staging/``. A rerun reads the chunks' image names and skips those images; when
every image is done the chunks are merged, streaming, into the output (again tmp +
rename) and the staging folder is removed. A kill at any moment therefore loses at most
the batch in flight, never duplicates a row and never leaves a half-written output.

A finished output written with the same teacher, polisher, classes, thresholds and box
source (teacher or a detections file, ``META_BOXES``) counts
as done: its images are skipped, and new images (e.g. added to the folder) are merged
into it. Images written as ``status="skipped"`` (unreadable then) are not done: a rerun
retries them (``retry``) and the merge drops every earlier skipped row, keeping the new
one (read now, or skipped again). ``known_ids`` (file name -> image id already written)
lets a resume keep ids stable. Chunks never replace an earlier run's chunk.

Sharded runs write ``part-IIIII-of-NNNNN.parquet`` into an output directory,
which reads as one dataset (``read_pseudo_labels`` / ``pyarrow.dataset``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dpl_tools.data.pseudo_labels import (
    SCHEMA,
    decode_metadata,
    encode_metadata,
    fingerprint_differences,
    part_counts,
)
from dpl_tools.errors import DplError
from dpl_tools.io import atomic_path
from dpl_tools.outputs import refuse_link

CHUNK_GLOB = "chunk-*.parquet"
ROW_GROUP_ROWS = 32768


def part_name(index: int, count: int) -> str:
    """File name of shard ``index`` of ``count`` in a part-file output directory."""
    return f"part-{index:05d}-of-{count:05d}.parquet"


def output_file(out: str | Path, shard_index: int = 0, shard_count: int = 1) -> Path:
    """The Parquet file this process writes: ``out`` itself for a single ``.parquet`` file,
    else ``out/part-IIIII-of-NNNNN.parquet`` (sharded runs, or ``out`` a directory)."""
    out = Path(out)
    if shard_count == 1 and out.suffix.lower() == ".parquet" and not out.is_dir():
        return out
    if out.exists() and not out.is_dir():
        if shard_count > 1:
            raise DplError(
                f"{out}: a sharded run (shard {shard_index} of {shard_count}) writes part files "
                "into a directory: --out must be a directory, not a file"
            )
        raise DplError(
            f"{out}: --out is an existing file without the .parquet suffix; give a .parquet "
            "file or a directory (of part files)"
        )
    others = part_counts(out) - {shard_count} if out.is_dir() else set()
    if others:
        raise DplError(
            f"{out}: holds the part files of a run with {min(others)} shard(s); this one has "
            f"{shard_count}: their parts would label the same images twice. Use another --out, "
            "or the same shard count"
        )
    return out / part_name(shard_index, shard_count)


def staging_dir(dest: str | Path) -> Path:
    """Hidden folder beside ``dest`` holding its chunks while a run is under way."""
    dest = Path(dest)
    return dest.parent / f".{dest.name}.staging"


def _index(path: Path) -> list[tuple[str, int, str]]:
    """(file name, image id, status) of every row of one Parquet file (3 columns read)."""
    try:
        t = pq.read_table(path, columns=["file_name", "image_id", "status"])
    except (pa.ArrowInvalid, OSError) as e:
        raise DplError(f"{path}: not a readable Parquet file ({e})") from None
    columns = (t[name].to_pylist() for name in ("file_name", "image_id", "status"))
    return list(zip(*columns, strict=True))


def _without_skipped(table: pa.Table) -> pa.Table:
    """Rows whose status is not "skipped" (their images are retried or done elsewhere)."""
    return table.filter(pc.invert(pc.equal(table["status"], "skipped").fill_null(False)))


def sibling_max_id(dest: Path) -> int:
    """The largest image id in the other part files beside ``dest`` (0 when none), so a
    sharded resume numbers new images above every shard's ids."""
    top = 0
    for part in dest.parent.glob("part-*.parquet"):
        if part == dest:
            continue
        try:
            value = pc.max(pq.read_table(part, columns=["image_id"])["image_id"]).as_py()
        except (pa.ArrowInvalid, OSError, KeyError):
            continue
        top = max(top, value or 0)
    return top


def empty_columns() -> dict[str, list]:
    """Per-column lists for the pseudo-label SCHEMA, to fill with ``append_row``."""
    return {name: [] for name in SCHEMA.names}


def append_row(cols: dict[str, list], row: dict[str, Any]) -> None:
    """Append one row to ``cols`` (a column the row lacks is null)."""
    for name, values in cols.items():
        values.append(row.get(name))


def rows_to_table(columns: dict[str, list], metadata: dict[str, Any] | None = None) -> pa.Table:
    """A table in the pseudo-label SCHEMA from per-column lists (missing columns are null)."""
    n = len(columns["file_name"])
    arrays = [pa.array(columns.get(f.name, [None] * n), type=f.type) for f in SCHEMA]
    schema = SCHEMA.with_metadata(encode_metadata(metadata)) if metadata else SCHEMA
    return pa.Table.from_arrays(arrays, schema=schema)


class PseudoLabelWriter:
    """Writes one pseudo-label file batch by batch, resumably (see module docstring)."""

    def __init__(self, dest: str | Path, metadata: dict[str, Any], overwrite: bool = False):
        self.dest = Path(dest)
        self.staging = staging_dir(self.dest)
        self.metadata = metadata
        self.schema = SCHEMA.with_metadata(encode_metadata(metadata))
        self.overwrite = overwrite
        self._keep_existing = False
        self.known_ids: dict[str, int] = {}  # file name -> image id already written
        self.retry: set[str] = set()  # images written as skipped earlier, retried now
        self._old_sources: set[Path] = set()  # written before this run (skipped rows dropped)

    def _check_same_job(self, path: Path, what: str) -> None:
        try:
            theirs = decode_metadata(pq.read_schema(path).metadata, path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DplError(f"{path}: not a readable Parquet file ({e})") from None
        differ = fingerprint_differences(theirs, self.metadata)
        if differ:
            raise DplError(
                f"{path}: {what} was written with a different {', '.join(differ)}; "
                "pass --overwrite to start again or choose another --out"
            )

    def open(self) -> set[str]:
        """Prepare the staging folder; return the file names already written (to skip)."""
        refuse_link(self.staging, "the staging folder")  # never write chunks through a link
        if self.staging.exists() and not self.staging.is_dir():
            raise DplError(
                f"{self.staging}: dpl's staging folder of {self.dest.name} is a file; remove it"
            )
        if self.overwrite:
            shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        for stray in self.staging.glob(".*.tmp"):  # a chunk being written when killed
            stray.unlink(missing_ok=True)
        done: set[str] = set()  # images with a processed ("ok") row
        skipped: set[str] = set()  # images with a "skipped" row (unreadable then)

        def note(path: Path, rows: list[tuple[str, int, str]]) -> None:
            for name, image_id, status in rows:
                self.known_ids.setdefault(name, image_id)
                (skipped if status == "skipped" else done).add(name)
            self._old_sources.add(path)

        if self.dest.exists() and not self.overwrite:
            self._check_same_job(self.dest, "the existing output")
            note(self.dest, _index(self.dest))
            self._keep_existing = True
        for chunk in self.chunks():
            self._check_same_job(chunk, "an unfinished earlier run's chunk")
            rows = _index(chunk)
            if self._keep_existing and done.intersection(n for n, _, s in rows if s != "skipped"):
                # Killed after the merge was renamed into place but before cleanup.
                chunk.unlink()
                continue
            note(chunk, rows)
        # Unreadable images are retried: their old "skipped" rows are dropped by finish(),
        # which keeps this run's row (read now, or skipped again with the new reason).
        self.retry = skipped - done
        return done

    def chunks(self) -> list[Path]:
        """Finished chunk files, in image-list order."""
        return sorted(self.staging.glob(CHUNK_GLOB)) if self.staging.is_dir() else []

    def write_chunk(self, table: pa.Table, first_index: int) -> Path:
        """Write one batch's rows atomically; ``first_index`` (position of its first image in
        this process's image list) names the chunk so the merge keeps list order."""
        path = self.staging / f"chunk-{first_index:09d}.parquet"
        n = 0
        while path in self._old_sources or path.exists():  # never replace an earlier chunk
            n += 1
            path = self.staging / f"chunk-{first_index:09d}-{n}.parquet"
        with atomic_path(path, clean=False) as tmp:  # open() cleared stale chunk temps
            pq.write_table(table.cast(self.schema), tmp)
        return path

    def finish(self) -> bool:
        """Merge the chunks (and an earlier finished output) into ``dest``; drop the staging
        folder. Returns False when there was nothing new to write."""
        chunks = self.chunks()
        if not chunks and self.dest.exists() and self._keep_existing:
            shutil.rmtree(self.staging, ignore_errors=True)
            return False
        sources = ([self.dest] if self._keep_existing else []) + chunks
        with atomic_path(self.dest) as tmp:
            with pq.ParquetWriter(tmp, self.schema) as writer:
                pending: list[pa.Table] = []
                rows = 0
                for source in sources:
                    parquet = pq.ParquetFile(source)
                    for i in range(parquet.num_row_groups):
                        group = parquet.read_row_group(i).cast(self.schema)
                        if source in self._old_sources:
                            group = _without_skipped(group)
                        pending.append(group)
                        rows += group.num_rows
                        if rows >= ROW_GROUP_ROWS:
                            writer.write_table(pa.concat_tables(pending))
                            pending, rows = [], 0
                if pending or not sources:
                    writer.write_table(
                        pa.concat_tables(pending) if pending else self.schema.empty_table()
                    )
        shutil.rmtree(self.staging, ignore_errors=True)
        return True
