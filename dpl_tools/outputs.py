"""Output safety shared by every command that writes files.

* ``check_distinct_outputs``: an output may not be one of the command's inputs, nor another
  of its outputs (``--coco-out`` equal to ``--out`` would replace the Parquet with JSON),
  nor lie inside an input folder (whose files it reads); ``check_outputs_not_read``: nor
  be one of the files a list (a COCO image list) names.
* ``refuse_link``: lock, marker and staging files are never written through a link (the
  lock is opened with ``O_NOFOLLOW``; temps are new entries, ``O_EXCL``).
* ``inside``: a path built from a file name in the data stays inside its output folder.
* ``output_lock``: one writer per output, through ``flock`` on a lock file holding the pid.
* ``owned_folder``: write into a folder the user may share: a marker file lists what dpl
  wrote there, and dpl never deletes or replaces any other file.
* ``file_set``: publish several files (e.g. the three of a split) so that a kill never leaves
  files of two runs side by side.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import stat
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from dpl_tools.data.images import IMAGE_EXTENSIONS
from dpl_tools.errors import DplError
from dpl_tools.io import clean_stale_temps, make_temp, write_json

try:
    import fcntl
except ImportError:  # not POSIX: no locking (dpl targets Linux and macOS)
    fcntl = None

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# Files dpl reads out of an input folder (images, VOC / YOLO / COCO annotations, data.yaml):
# an output of such a kind inside an input folder could replace or join what is read there.
# Other outputs (a checkpoint, a Parquet file) may live in an image folder.
READ_SUFFIXES = frozenset(IMAGE_EXTENSIONS) | {".xml", ".txt", ".yaml", ".yml", ".json"}
MARKER = ".dpl-output.json"  # in every folder dpl writes as a whole: what it wrote there
FOLDER_LOCK = ".dpl-output.lock"  # lock file of a folder output (inside it)
STAGING = "dpl-staging"  # staging folders inside an output folder: .dpl-staging.<pid>.*.tmp
_STAGING_RE = re.compile(rf"^\.{STAGING}\.\d+\.[a-z0-9_]{{8}}\.tmp$")


def same_path(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same file or folder (after resolving links and ``..``)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links, case-insensitive file systems
    except OSError:
        return False


def lies_inside(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` (existing or not) lies inside ``folder``, after resolving links."""
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def check_distinct_outputs(
    inputs: Mapping[str, str | Path | None],
    outputs: Mapping[str, str | Path | None],
    folders: Collection[str] = (),
) -> None:
    """Refuse an output equal to an input or to another output, or a folder output or a
    file of a kind dpl reads from folders (``READ_SUFFIXES``: images, annotations) inside an
    input folder (a checkpoint or Parquet file may live there); keys name the options, e.g.
    ``--coco-out``; None values are skipped. Outputs not in ``folders`` are files and may
    not name an existing directory."""
    given = [(name, Path(path)) for name, path in outputs.items() if path is not None]
    input_dirs = [(n, Path(p)) for n, p in inputs.items() if p is not None and Path(p).is_dir()]
    for i, (name, path) in enumerate(given):
        if name not in folders and path.is_dir():
            raise DplError(f"{path}: {name} names an existing directory; give a file path")
        for in_name, in_path in inputs.items():
            if in_path is not None and same_path(path, in_path):
                raise DplError(
                    f"{path}: {name} is the input {in_name}; writing it would destroy the "
                    f"input, choose another {name}"
                )
        read_kind = name in folders or path.suffix.lower() in READ_SUFFIXES
        for in_name, folder in input_dirs:
            if read_kind and lies_inside(path, folder):
                what = "a folder" if name in folders else f"a {path.suffix} file"
                raise DplError(
                    f"{path}: {name} lies inside the input folder {in_name} ({folder}), where "
                    f"dpl reads such files ({what}); choose another {name}"
                )
        for other_name, other in given[:i]:
            if same_path(path, other):
                raise DplError(
                    f"{path}: {name} and {other_name} are the same path; give each output its own"
                )


def check_outputs_not_read(
    outputs: Mapping[str, str | Path | None], read: Iterable[str | Path], source: str
) -> None:
    """Refuse an output that is one of the files ``read`` (e.g. the images a COCO image
    list names; ``source`` words the error). Only an existing output can be one; a read
    file is compared (as given, then resolved) only when its base name is an output's, so
    a long list costs no system call per file."""
    given = [(n, Path(p)) for n, p in outputs.items() if p is not None and os.path.lexists(p)]
    if not given:
        return
    wanted: dict[str, str] = {}
    for name, path in given:
        wanted[os.path.normpath(os.path.abspath(path))] = name
        wanted.setdefault(str(path.resolve()), name)
    base_names = {os.path.basename(p) for p in wanted}
    for file in read:
        file = os.fspath(file)
        if os.path.basename(file) not in base_names:
            continue
        name = wanted.get(os.path.normpath(os.path.abspath(file)))
        name = name or wanted.get(str(Path(file).resolve()))
        if name is not None:
            raise DplError(
                f"{outputs[name]}: {name} is an image that {source} reads; writing it would "
                f"destroy the input, choose another {name}"
            )


def refuse_link(path: str | Path, what: str) -> None:
    """A one-line DplError when ``path`` is a symbolic link: dpl never writes its own
    bookkeeping files (``what``: lock, marker, staging folder) through a link."""
    if os.path.islink(path):
        raise DplError(
            f"{path}: {what} is a symbolic link; dpl does not write through a link in place "
            "of its own files: remove the link"
        )


def inside(folder: str | Path, name: str | Path, what: str = "file name") -> Path:
    """``folder / name`` with its folders resolved, refused (one-line DplError) unless it
    lies inside ``folder``: an absolute name, one with ``..`` or a linked folder must not
    write elsewhere. The last component is not resolved: a link dpl wrote there (an
    exported dataset's image) is that link, to replace or delete, not the file it names."""
    root = Path(folder).resolve()
    rel = Path(name)
    parent = (root / rel).parent.resolve()
    path = parent / rel.name
    if (
        rel.is_absolute()
        or rel.name in ("", "..")
        or path == root
        or not parent.is_relative_to(root)
    ):
        raise DplError(
            f"{name}: {what} leads outside the output folder {folder}; outputs are only "
            "written inside their folder"
        )
    return path


def lock_path(output: str | Path, folder: bool = False) -> Path:
    """The lock file of ``output``: ``.<name>.lock`` beside a file, ``.dpl-output.lock``
    inside a folder."""
    output = Path(output)
    return output / FOLDER_LOCK if folder else output.parent / f".{output.name}.lock"


def _holder(fd: int) -> str:
    """Who holds a lock, from the lock file's content (best effort)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError, UnicodeDecodeError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another dpl process"
    where = f" on {info['host']}" if info.get("host") else ""
    what = f", `{info['command']}`" if info.get("command") else ""
    return f"another dpl process (pid {info['pid']}{where}{what})"


@contextlib.contextmanager
def output_lock(output: str | Path, command: str, folder: bool = False) -> Iterator[Path]:
    """Hold an exclusive lock on ``output`` (see ``lock_path``) while writing it; a second
    writer fails at once with a one-line error naming the output and the holder's pid.

    The lock is an ``flock`` on a file holding pid, host and command, released by the kernel
    when the process dies: a lock file left by a killed run is simply taken over. Stale temp
    files of the output (``atomic_path``'s, of a dead pid) are removed once the lock is held.
    """
    output = Path(output)
    lock = lock_path(output, folder)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(output, lock) if fcntl is not None else -1
    try:
        if fd >= 0:
            info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({**info, "started": time.time()}).encode(), 0)
        if not folder:
            clean_stale_temps(output, min_age_s=0.0)
        yield lock
    finally:
        if fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
            os.close(fd)


def _acquire(output: Path, lock: Path) -> int:
    """Open and ``flock`` the lock file; -1 where the file system has no locks."""
    while True:
        try:  # never through a link (nor onto a file with other names: a hard link)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | _NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            refuse_link(lock, "the lock file")
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
            os.close(fd)
            refuse_link(lock, "the lock file")
            raise DplError(
                f"{lock}: the lock file is not a plain file of its own (a hard link or a "
                "special file); dpl does not write to it: remove it"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            held = e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
            holder = _holder(fd) if held else ""
            os.close(fd)
            if not held:
                return -1
            raise DplError(
                f"{output}: {holder} is writing this output; wait for it to finish or stop it "
                f"(lock file {lock})"
            ) from None
        try:  # the holder before us may have removed the file between our open and flock
            current, mine = os.stat(lock), os.fstat(fd)
            if (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _read_marker(folder: Path) -> dict[str, Any] | None:
    marker = folder / MARKER
    refuse_link(marker, "the dpl marker file")
    if not marker.exists():
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DplError(f"{marker}: unreadable dpl marker file ({e})") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise DplError(f"{marker}: not a dpl marker file (no list of files)")
    return data


def _user_entries(folder: Path) -> list[str]:
    """Entries of ``folder`` other than dpl's marker, lock and staging folders."""
    return [
        e.name
        for e in os.scandir(folder)
        if e.name not in (MARKER, FOLDER_LOCK) and not _STAGING_RE.match(e.name)
    ]


def check_owned_folder(
    folder: str | Path, kind: str, what: str, overwrite: bool = False, hint: str = ""
) -> list[str]:
    """Refuse to write output ``kind`` into ``folder`` unless it is absent, empty, marked as
    dpl's output of that kind, or ``overwrite`` is given; returns the files dpl wrote there
    before (from the marker). ``what`` and ``hint`` word the error."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DplError(f"{folder}: exists and is not a folder")
    if not folder.is_dir():
        return []
    marker = _read_marker(folder)
    if marker is not None:
        if marker.get("kind") != kind:
            raise DplError(
                f"{folder}: holds another dpl output ({marker.get('command', '?')}, see "
                f"{MARKER}); choose another folder"
            )
        return list(marker["files"])
    if not overwrite and _user_entries(folder):
        raise DplError(
            f"{folder}: folder is not empty and is not {what} (no {MARKER} marker file); "
            f"choose another folder{hint}"
        )
    return []


def _prune_empty(folder: Path, path: Path) -> None:
    """Remove the now-empty folders above ``path``, up to (not including) ``folder``."""
    parent = path.parent
    while parent != folder and parent.is_relative_to(folder):
        try:
            parent.rmdir()
        except OSError:
            return
        parent = parent.parent


def _commit(folder: Path, staging: Path, kind: str, command: str, previous: list[str]) -> None:
    """Move every file under ``staging`` into ``folder``, then delete the files dpl wrote
    there before that this run did not write again; the marker lists every dpl file
    throughout, so a kill at any point leaves nothing dpl would later refuse to replace."""
    root = folder.resolve()
    new = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if not p.is_dir())
    owned = set(previous)
    for rel in new:
        if rel in (MARKER, FOLDER_LOCK):
            raise DplError(f"{folder / rel}: name reserved for dpl's own bookkeeping")
        target = inside(root, rel)
        if target.is_dir():
            raise DplError(f"{folder / rel}: is a folder; cannot write a file there")
        if (target.exists() or target.is_symlink()) and rel not in owned:
            raise DplError(
                f"{folder / rel}: exists and was not written by dpl; dpl replaces only the files "
                f"it wrote itself ({MARKER}): move it away or choose another folder"
            )

    def marker(files: Collection[str], complete: bool) -> None:
        body = {"kind": kind, "command": command, "complete": complete, "files": sorted(files)}
        write_json(folder / MARKER, {**body, "written": time.time()}, indent=1)

    marker(owned | set(new), complete=False)
    for rel in new:
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, target)
    for rel in sorted(owned - set(new)):
        try:
            target = inside(root, rel)
        except DplError:
            continue  # a marker edited to point elsewhere: never delete outside the folder
        if target.is_file() or target.is_symlink():
            target.unlink()
            _prune_empty(root, target)
    marker(new, complete=True)


@contextlib.contextmanager
def owned_folder(
    folder: str | Path,
    kind: str,
    command: str,
    what: str,
    overwrite: bool = False,
    hint: str = "",
) -> Iterator[Path]:
    """Yield an empty staging folder; on success the files written under it are moved into
    ``folder`` and the marker updated (see ``check_owned_folder`` and ``_commit``).

    Nothing in ``folder`` changes unless the block succeeds; dpl never deletes or replaces a
    file there that its marker does not list. The folder is locked while it is written.
    """
    folder = Path(folder)
    check_owned_folder(folder, kind, what, overwrite, hint)
    folder.mkdir(parents=True, exist_ok=True)
    with output_lock(folder, command, folder=True):
        previous = check_owned_folder(folder, kind, what, overwrite, hint)
        clean_stale_temps(folder / STAGING, min_age_s=0.0)  # we hold the lock
        staging = make_temp(folder / STAGING, directory=True)
        try:
            yield staging
            _commit(folder, staging, kind, command, previous)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _check_replaceable(targets: Sequence[Path], ours: Callable[[Path], bool], command: str) -> None:
    """Refuse a set member that is a folder, a link, or a file ``ours`` does not
    recognise as an earlier output of ``command``."""
    for target in targets:
        if target.is_dir():
            raise DplError(f"{target}: is a folder; cannot write a file there")
        if target.is_symlink() or (target.exists() and not ours(target)):
            raise DplError(
                f"{target}: exists and was not written by {command}; dpl replaces only its "
                f"own files: move it away or choose another folder"
            )


@contextlib.contextmanager
def file_set(
    folder: str | Path, names: Sequence[str], command: str, ours: Callable[[Path], bool]
) -> Iterator[dict[str, Path]]:
    """Yield a staging path per name; on success publish them all as ``folder/<name>``.

    An existing member is replaced only when ``ours(path)`` says ``command`` wrote it (a
    user's file of the same name is refused before any work). The old members are removed
    first, then the new ones renamed in: a kill at any moment leaves the old set, the new
    set, or some files missing (a loud error for the next reader), never files of two runs
    side by side. Other files in ``folder`` are untouched.
    """
    folder = Path(folder)
    targets = [folder / name for name in names]
    _check_replaceable(targets, ours, command)
    folder.mkdir(parents=True, exist_ok=True)
    with output_lock(folder, command, folder=True):
        _check_replaceable(targets, ours, command)  # again, now that we hold the lock
        clean_stale_temps(folder / STAGING, min_age_s=0.0)  # we hold the lock
        staging = make_temp(folder / STAGING, directory=True)
        try:
            staged = {name: staging / name for name in names}
            yield staged
            missing = [name for name, path in staged.items() if not path.is_file()]
            if missing:
                raise RuntimeError(f"file_set: {', '.join(missing)} not written")
            for target in targets:
                target.unlink(missing_ok=True)
            for name, target in zip(names, targets, strict=True):
                os.replace(staged[name], target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
