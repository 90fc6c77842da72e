"""COCO images + boxes as detector training/evaluation samples (torchvision format)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from dpl_tools.data.augment import DetectionAugment
from dpl_tools.data.coco import CocoData
from dpl_tools.data.images import ImageReadError, read_image

Target = dict[str, Any]


def image_tensor(path: str | Path) -> torch.Tensor:
    """Decode an image file to a float CHW tensor in 0..1 (raises ImageReadError)."""
    return pil_to_tensor(read_image(path)).float().div_(255.0)


def report_skipped(path: str | Path, reason: str) -> None:
    """Tell the user an unreadable image was skipped (works inside DataLoader workers)."""
    print(f"warning: skipped unreadable image {path}: {reason}", file=sys.stderr, flush=True)


class DetectionDataset(Dataset):
    """Items ``(image float CHW 0..1, {"boxes" xyxy float [N,4], "labels" int64 1..C,
    "image_id"})``, transformed by ``augment`` for training (None: as stored). An
    unreadable image gives ``None`` (reported on stderr), which ``collate_detection`` drops."""

    def __init__(
        self, coco: CocoData, images_dir: str | Path, augment: DetectionAugment | None = None
    ) -> None:
        self.coco = coco
        self.images_dir = Path(images_dir)
        self.augment = augment
        self.records = list(coco.images)
        by_image = coco.annotations_by_image()
        cat_to_label = coco.cat_to_label
        self.targets: list[tuple[torch.Tensor, torch.Tensor]] = []
        for record in self.records:
            anns = [a for a in by_image.get(record["id"], []) if not a.get("iscrowd", 0)]
            boxes = torch.tensor(
                [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                dtype=torch.float32,
            ).reshape(-1, 4)
            labels = torch.tensor([cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
            self.targets.append((boxes, labels))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target] | None:
        record = self.records[index]
        path = self.images_dir / record["file_name"]
        try:
            image = image_tensor(path)
        except ImageReadError as e:
            report_skipped(path, e.reason)
            return None
        boxes, labels = self.targets[index]
        target = {"boxes": boxes, "labels": labels, "image_id": record["id"]}
        if self.augment is not None:
            image, target = self.augment(image, target)
        return image, target


def collate_detection(batch: list) -> tuple[list[torch.Tensor], list[Target]]:
    """Lists of images and targets (detectors take lists); unreadable (None) items dropped."""
    batch = [item for item in batch if item is not None]
    return [image for image, _ in batch], [target for _, target in batch]
