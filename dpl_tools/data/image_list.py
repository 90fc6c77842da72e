"""The unlabeled image source of ``dpl polish``: a folder or a COCO JSON image list.

Records are COCO-style dicts ``{"id", "file_name", "path"}`` (plus ``width``/``height``
when a COCO list gives them). A folder is listed recursively (common extensions, sorted)
and numbered 1..N in that order (shard I of N numbers its own I+1, I+1+N, ...); on a
resume ``stable_ids`` keeps the ids an output already holds and numbers new images above
them. A COCO JSON keeps its own ids (integers;
``3.0`` is ``3``) and file names (resolved against ``image_root``, by default the JSON's
folder, and refused when they leave it unless ``allow_outside_root``). Entries of a
folder passed over while listing (folders named like images, dangling or looping links)
are in ``ImageList.skipped``; images reached through a linked folder leading out of the
folder are not read unless ``allow_outside_root`` (counted in ``ImageList.outside``).
``UnlabeledImages`` decodes records in DataLoader workers
and yields the skip reason instead of raising for a bad file.
"""

from __future__ import annotations

import itertools
import json
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from dpl_tools.data.coco import (
    as_int_id,
    check_inside_root,
    in_int64,
    positive_number,
    read_json,
    same_file_name,
)
from dpl_tools.data.images import (
    ImageReadError,
    display_path,
    read_image,
    scan_images,
    utf8_name,
)
from dpl_tools.errors import DplError

ImageRecord = dict[str, Any]


class ImageList(list):
    """Image records (a list) plus ``skipped``: (path, reason) of entries passed over, and
    ``outside``: image files not read because a linked folder led out of the image folder."""

    def __init__(
        self,
        records: Sequence[ImageRecord],
        skipped: Sequence[tuple[str, str]] = (),
        outside: int = 0,
    ):
        super().__init__(records)
        self.skipped = list(skipped)
        self.outside = outside


def _inside_root(root: Path, files: list[Path], skipped: list) -> tuple[list[Path], list, int]:
    """The files and skipped entries whose folder lies inside ``root`` once links are
    resolved (a linked folder leading out of the root is not read), and how many files
    were left out that way."""
    real_root = root.resolve()
    folders: dict[Path, bool] = {}

    def kept(path: Path) -> bool:
        if path.parent not in folders:
            folders[path.parent] = path.parent.resolve().is_relative_to(real_root)
        return folders[path.parent]

    inside = [p for p in files if kept(p)]
    return inside, [(p, why) for p, why in skipped if kept(p)], len(files) - len(inside)


def _folder_records(root: Path, allow_outside_root: bool = False) -> ImageList:
    scan = scan_images(root)
    outside = 0
    if not allow_outside_root:
        scan.files, scan.skipped, outside = _inside_root(root, scan.files, scan.skipped)
    bad_names = [p for p in scan.files if not utf8_name(p.relative_to(root))]
    if bad_names:
        raise DplError(
            f"{display_path(bad_names[0])}: file name is not valid UTF-8 ({len(bad_names)} such "
            "file(s) in the folder); rename them (e.g. with convmv) so they can be stored"
        )
    if not scan.files and outside:
        raise DplError(
            f"{root}: its {outside} image file(s) lie in linked folders leading outside it, "
            "which are not read (--allow-outside-root reads them)"
        )
    if not scan.files:
        raise DplError(f"{root}: no image files found (looked recursively for common extensions)")
    records = [
        {"id": i, "file_name": p.relative_to(root).as_posix(), "path": str(p), "numbered": True}
        for i, p in enumerate(scan.files, start=1)
    ]
    skipped = [(display_path(p), reason) for p, reason in scan.skipped]
    return ImageList(records, skipped, outside)


def _coco_records(path: Path, image_root: Path, allow_outside_root: bool) -> ImageList:
    raw = read_json(path)
    images = raw.get("images") if isinstance(raw, dict) else None
    if not isinstance(images, list):
        raise DplError(f"{path}: not a COCO image list (no 'images' list)")
    records, seen_ids, seen_names = [], set(), set()
    for n, image in enumerate(images):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise DplError(f"{path}: image #{n} lacks 'id' or 'file_name'")
        image_id, name = as_int_id(image["id"]), image["file_name"]
        if image_id is None:
            raise DplError(
                f"{path}: image #{n} has id {json.dumps(image['id'])} (a "
                f"{type(image['id']).__name__}); image ids must be integers"
            )
        if not in_int64(image_id):
            raise DplError(
                f"{path}: image #{n} has id {image_id}, outside the 64-bit integer range; "
                "ids must fit in int64"
            )
        if not isinstance(name, str) or not name or "\0" in name:
            raise DplError(
                f"{path}: image #{n} (id {image_id}) has file_name {json.dumps(name)}; it must "
                "be a non-empty string"
            )
        if image_id in seen_ids or same_file_name(name) in seen_names:
            raise DplError(
                f"{path}: image #{n}: duplicate image id or file name (id {image_id}, {name!r})"
            )
        seen_ids.add(image_id)
        seen_names.add(same_file_name(name))
        record = {"id": image_id, "file_name": name, "path": str(image_root / name)}
        if positive_number(image.get("width")) and positive_number(image.get("height")):
            record["width"], record["height"] = image["width"], image["height"]
        records.append(record)
    if not records:
        raise DplError(f"{path}: the image list is empty")
    check_inside_root(
        path, [(r["id"], r["file_name"]) for r in records], image_root, allow_outside_root
    )
    return ImageList(records)


def load_image_list(
    source: str | Path, image_root: str | Path | None = None, allow_outside_root: bool = False
) -> ImageList:
    """Image records of a folder (recursive; images in a linked folder that leads outside
    it are read only with ``allow_outside_root``, else counted in ``outside``) or a COCO
    JSON (file names under ``image_root``, which they may leave only with
    ``allow_outside_root``)."""
    source = Path(source)
    if source.is_dir():
        if image_root is not None:
            raise DplError(
                f"--image-root is only for a COCO JSON image list, not a folder ({source})"
            )
        return _folder_records(source, allow_outside_root)
    if not source.exists():
        raise DplError(f"{source}: image folder or COCO JSON not found")
    if source.suffix.lower() != ".json":
        raise DplError(f"{source}: expected an image folder or a COCO JSON image list")
    root = Path(image_root) if image_root is not None else source.parent
    return _coco_records(source, root, allow_outside_root)


def stable_ids(
    records: Sequence[ImageRecord],
    known: dict[str, int],
    floor: int = 0,
    source: str = "output",
    shard: tuple[int, int] = (0, 1),
) -> list[ImageRecord]:
    """Records with the ids an earlier run already wrote (``known``: file name -> id).

    Folder records (numbered by dpl) keep the id written for their file and new files are
    numbered above every id in use (and above ``floor``, e.g. the largest id of sibling
    part files), among ``shard``'s own ids (``shard_ids``), so adding an image never
    renumbers or duplicates ids on a resume. A COCO list's own ids must agree with what
    ``source`` holds (else a DplError).
    """
    if not known:
        return list(records)
    owner = {image_id: name for name, image_id in known.items()}
    new_ids = shard_ids(*shard, above=max(max(owner), floor))
    out = []
    for record in records:
        name, old = record["file_name"], known.get(record["file_name"])
        if record.get("numbered"):
            if old is None:
                old = next(new_ids)
            out.append({**record, "id": old})
            continue
        if old is not None and old != record["id"]:
            raise DplError(
                f"{source}: image {name!r} was written with id {old} but the image list now "
                f"gives it id {record['id']}; pass --overwrite to start again"
            )
        if old is None and owner.get(record["id"], name) != name:
            raise DplError(
                f"{source}: image id {record['id']} of {name!r} in the image list is already "
                f"used by {owner[record['id']]!r}; pass --overwrite to start again"
            )
        out.append(dict(record))
    return out


def shard_of(file_name: str, count: int) -> int:
    """The shard (0-based, of ``count``) that polishes ``file_name``: a hash of the name
    alone, so that an image stays in its shard when other images are added or removed."""
    return zlib.crc32(file_name.encode("utf-8")) % count


def shard_records(records: Sequence[ImageRecord], index: int, count: int) -> list[ImageRecord]:
    """Shard ``index`` of ``count`` (0-based): the records whose file name hashes to it.

    The shards partition the list, each image exactly once, and an image's shard does not
    depend on the rest of the list: shards started while the folder grows never polish an
    image twice (sizes are equal only on average).
    """
    if count < 1 or not 0 <= index < count:
        raise DplError(f"shard {index}/{count}: need 0 <= index < count")
    mine = [r for r in records if shard_of(r["file_name"], count) == index]
    if count == 1:
        return mine
    # folder images: each shard numbers its own, apart from the others' (shard_ids), so
    # shards that list a growing folder at different times never give two images one id
    ids = shard_ids(index, count)
    return [{**r, "id": next(ids)} if r.get("numbered") else r for r in mine]


def shard_ids(index: int, count: int, above: int = 0) -> Iterator[int]:
    """The ids shard ``index`` of ``count`` gives its folder images, in order, from the
    first above ``above``: index + 1, index + 1 + count, ... (1, 2, 3, ... unsharded)."""
    first = index + 1
    if above >= first:
        first += (above - first) // count * count + count
    return itertools.count(first, count)


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (0-based I) as ``(I, N)``, or a DplError."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise DplError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise DplError(f"--shard {text}: need 0 <= I < N")
    return index, count


class UnlabeledImages(Dataset):
    """Items ``(record, uint8 CHW tensor or None, skip reason or None)``."""

    def __init__(self, records: Sequence[ImageRecord]) -> None:
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[ImageRecord, torch.Tensor | None, str | None]:
        record = self.records[index]
        try:
            return record, pil_to_tensor(read_image(record["path"])), None
        except ImageReadError as e:
            return record, None, e.reason


def collate_images(batch: list) -> list:
    """Keep a batch as a list (images differ in size; bad ones carry a reason)."""
    return batch
