"""The unlabeled image source of ``dpl polish``: a folder or a COCO JSON image list.

Records are COCO-style dicts ``{"id", "file_name", "path"}``. A folder is listed
recursively (common extensions, sorted) and numbered 1..N in that order; a COCO JSON
keeps its own ids and file names (resolved against ``image_root``, by default the JSON's
folder). ``UnlabeledImages`` decodes them in DataLoader workers and yields the skip
reason instead of raising for a bad file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from dpl_tools.data.coco import read_json
from dpl_tools.data.images import ImageReadError, list_images, read_image
from dpl_tools.errors import DplError

ImageRecord = dict[str, Any]


def _folder_records(root: Path) -> list[ImageRecord]:
    paths = list_images(root)
    if not paths:
        raise DplError(f"{root}: no image files found (looked recursively for common extensions)")
    return [
        {"id": i, "file_name": p.relative_to(root).as_posix(), "path": str(p)}
        for i, p in enumerate(paths, start=1)
    ]


def _coco_records(path: Path, image_root: Path) -> list[ImageRecord]:
    raw = read_json(path)
    images = raw.get("images") if isinstance(raw, dict) else None
    if not isinstance(images, list):
        raise DplError(f"{path}: not a COCO image list (no 'images' list)")
    records, seen_ids, seen_names = [], set(), set()
    for n, image in enumerate(images):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise DplError(f"{path}: image #{n} lacks 'id' or 'file_name'")
        if image["id"] in seen_ids or image["file_name"] in seen_names:
            raise DplError(
                f"{path}: duplicate image id or file name (e.g. id {image['id']!r}, "
                f"{image['file_name']!r})"
            )
        seen_ids.add(image["id"])
        seen_names.add(image["file_name"])
        records.append(
            {
                "id": int(image["id"]),
                "file_name": str(image["file_name"]),
                "path": str(image_root / image["file_name"]),
            }
        )
    if not records:
        raise DplError(f"{path}: the image list is empty")
    return records


def load_image_list(source: str | Path, image_root: str | Path | None = None) -> list[ImageRecord]:
    """Image records of a folder (recursive) or a COCO JSON (file names under ``image_root``)."""
    source = Path(source)
    if source.is_dir():
        if image_root is not None:
            raise DplError(
                f"--image-root is only for a COCO JSON image list, not a folder ({source})"
            )
        return _folder_records(source)
    if not source.exists():
        raise DplError(f"{source}: image folder or COCO JSON not found")
    if source.suffix.lower() != ".json":
        raise DplError(f"{source}: expected an image folder or a COCO JSON image list")
    return _coco_records(source, Path(image_root) if image_root is not None else source.parent)


def shard_records(records: Sequence[ImageRecord], index: int, count: int) -> list[ImageRecord]:
    """Shard ``index`` of ``count`` (0-based): every ``count``-th record from ``index``.

    The shards partition the list, each image exactly once, sizes differing by at most 1.
    """
    if count < 1 or not 0 <= index < count:
        raise DplError(f"shard {index}/{count}: need 0 <= index < count")
    return list(records[index::count])


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
