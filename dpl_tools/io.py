"""Crash-safe file writing and content hashes shared by every stage."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# A temp file or folder of a dead run is removed by the next write of the same output once
# it is this old (a live writer in another container, whose pid we cannot see, keeps its
# temp's modification time fresh while it writes).
STALE_TEMP_S = 60.0
_RANDOM = "[a-z0-9_]{8}"  # tempfile's random part


def _umask() -> int:
    """This process's umask (read from /proc where possible: os.umask can only be read by
    setting it, which races with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode ``open``/``mkdir`` would give a new file or folder (0644 / 0755 under the
    usual umask 022); temp files are made 0600 by ``tempfile`` and fixed to this."""
    return (0o777 if directory else 0o666) & ~_umask()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a process of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def make_temp(dest: str | Path, suffix: str = "", directory: bool = False) -> Path:
    """Create ``.<name>.<pid>.<random><suffix>.tmp`` beside ``dest`` (a file, or a folder
    with ``directory``), with the default mode; the pid lets a later run tell it stale."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix, tail = f".{dest.name}.{os.getpid()}.", suffix + ".tmp"
    # mkstemp / mkdtemp create a new entry (O_EXCL, O_NOFOLLOW): never a planted link.
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=tail, dir=dest.parent))
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=tail, dir=dest.parent)
        tmp = Path(name)
    try:
        os.fchmod(fd, default_mode(directory))  # the new entry itself, never a link's target
    finally:
        os.close(fd)
    return tmp


def clean_stale_temps(dest: str | Path, min_age_s: float = STALE_TEMP_S) -> list[Path]:
    """Remove temps of ``dest`` (made by ``make_temp``) left by a run that died: the pid in
    the name no longer runs here and the temp is at least ``min_age_s`` old. Temps without
    a pid (left by older dpl versions) count once an hour old. Returns what was removed."""
    dest = Path(dest)
    pattern = re.compile(
        rf"^\.{re.escape(dest.name)}\.(?:(\d+)\.)?{_RANDOM}(?:\.[A-Za-z0-9]+)?\.tmp$"
    )
    removed = []
    try:
        entries = list(os.scandir(dest.parent))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = pattern.match(entry.name)
        if not match:
            continue
        pid = match.group(1)
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        stale = (age >= min_age_s and not pid_alive(int(pid))) if pid else age >= 3600
        if not stale:
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_path(dest: str | Path, suffix: str = "", clean: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only on success.

    A reader never sees a half-written output: either the old file, or the new one whole,
    also after a power loss (the temp is flushed to disk before the rename). The result has
    the umask's default mode (0644), not tempfile's 0600. With ``clean``, stale temps of
    ``dest`` left by a killed earlier run are removed first.
    """
    dest = Path(dest)
    if clean:
        clean_stale_temps(dest)
    tmp_path = make_temp(dest, suffix)
    try:
        yield tmp_path
        if tmp_path.is_file():
            fd = os.open(tmp_path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-Infinity) replaced by None: dpl never
    writes NaN or Infinity, which are not JSON and break other readers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj


def json_text(obj: Any, indent: int | None = None) -> str:
    """Strict JSON of ``obj`` (non-finite floats as null, ``finite_json``)."""
    return json.dumps(finite_json(obj), indent=indent, allow_nan=False)


def write_json(dest: str | Path, obj: Any, indent: int | None = None) -> None:
    """Write ``obj`` as strict JSON (``json_text``) to ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(json_text(obj, indent))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (used to tie polishers and labels to their teacher)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
