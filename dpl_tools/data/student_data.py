"""The student's training data: labeled images with ground truth plus pseudo-labeled images.

``PseudoLabeledDataset`` turns per-image pseudo labels (``pseudo_targets``) into detector
targets: ``boxes`` / ``labels`` (classification pseudo labels, used by the RPN and the
RoI classifier) and, for the disentangled view only, ``reg_boxes`` / ``reg_labels`` (the
regression pseudo labels, used by the RoI box regression). Every pseudo-labeled target is
marked ``pseudo=True``. ``StudentDataset`` pairs the two sets so that each item holds one
labeled image and, on average, ``unlabeled_ratio`` pseudo-labeled images.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import Dataset

from dpl_tools.data.coco import CocoData
from dpl_tools.data.detection import (
    DetectionDataset,
    Target,
    collate_detection,
    hflip,
    image_tensor,
    report_skipped,
)
from dpl_tools.data.images import ImageReadError
from dpl_tools.data.pseudo_labels import META_CATEGORIES
from dpl_tools.data.pseudo_targets import PseudoTargets
from dpl_tools.errors import DplError

Sample = tuple[torch.Tensor, Target]


def check_pseudo_categories(
    meta: dict, targets: list[PseudoTargets], coco: CocoData, pseudo_path: str | Path
) -> None:
    """The pseudo labels' classes (file metadata and the labels used) must be the labeled
    set's COCO categories; raises a one-line DplError naming the file otherwise."""
    ours = {int(c["id"]): str(c["name"]) for c in coco.categories}
    theirs_raw = meta.get(META_CATEGORIES)
    if theirs_raw is not None:
        theirs = {int(c["id"]): str(c["name"]) for c in theirs_raw}
        if theirs != ours:
            fmt = lambda cats: ", ".join(f"{k}:{v}" for k, v in sorted(cats.items()))  # noqa: E731
            raise DplError(
                f"{pseudo_path}: pseudo-label categories ({fmt(theirs)}) differ from "
                f"{coco.path}'s ({fmt(ours)})"
            )
    used = set()
    for t in targets:
        used.update(int(x) for x in t.cls_labels)
        used.update(int(x) for x in t.reg_labels)
    unknown = sorted(used - ours.keys())
    if unknown:
        raise DplError(
            f"{pseudo_path}: pseudo labels use category id(s) {unknown} that {coco.path} "
            "does not define"
        )


def _valid(boxes: torch.Tensor, labels: torch.Tensor, width: int, height: int):
    """Boxes clipped to the image, with empty ones dropped (torchvision rejects them)."""
    boxes = boxes.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep], labels[keep]


class PseudoLabeledDataset(Dataset):
    """Unlabeled images with their pseudo labels as detector targets (see module docstring).

    ``cat_to_label`` maps the pseudo labels' COCO category ids to detector labels 1..C.
    With ``disentangled`` false the targets have no ``reg_boxes`` (one set for every loss).
    Random horizontal flip (image, ``boxes`` and ``reg_boxes`` together) when ``train``.
    """

    def __init__(
        self,
        targets: list[PseudoTargets],
        images_dir: str | Path,
        cat_to_label: dict[int, int],
        disentangled: bool = True,
        train: bool = False,
    ) -> None:
        self.items = targets
        self.images_dir = Path(images_dir)
        self.disentangled = disentangled
        self.train = train
        self.targets: list[dict[str, torch.Tensor]] = []
        for t in targets:
            cls = _valid(
                torch.as_tensor(t.cls_boxes, dtype=torch.float32).reshape(-1, 4),
                torch.tensor([cat_to_label[int(c)] for c in t.cls_labels], dtype=torch.int64),
                t.width,
                t.height,
            )
            reg = _valid(
                torch.as_tensor(t.reg_boxes, dtype=torch.float32).reshape(-1, 4),
                torch.tensor([cat_to_label[int(c)] for c in t.reg_labels], dtype=torch.int64),
                t.width,
                t.height,
            )
            target = {"boxes": cls[0], "labels": cls[1]}
            if disentangled:
                target.update(reg_boxes=reg[0], reg_labels=reg[1])
            self.targets.append(target)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample | None:
        path = self.images_dir / self.items[index].file_name
        try:
            image = image_tensor(path)
        except ImageReadError as e:
            report_skipped(path, e.reason)
            return None
        target: Target = dict(self.targets[index])
        if self.train and torch.rand(1).item() < 0.5:
            image, target["boxes"] = hflip(image, target["boxes"])
            if "reg_boxes" in target:
                _, target["reg_boxes"] = hflip(image, target["reg_boxes"])
        target["pseudo"] = True
        return image, target


def missing_images(items: list[PseudoTargets], images_dir: str | Path) -> list[str]:
    """File names of pseudo-labeled images that are not in ``images_dir``."""
    images_dir = Path(images_dir)
    return [t.file_name for t in items if not (images_dir / t.file_name).is_file()]


class StudentDataset(Dataset):
    """Item ``i``: labeled image ``i mod L`` plus the pseudo-labeled images
    ``floor(i*r) .. floor((i+1)*r) - 1`` (mod U), so a batch of B items holds B labeled
    and on average ``r*B`` unlabeled images (exactly, when ``r`` is a whole number).
    One pass over the items visits every unlabeled image once and every labeled image at
    least once."""

    def __init__(
        self, labeled: DetectionDataset, unlabeled: PseudoLabeledDataset, unlabeled_ratio: float
    ) -> None:
        if unlabeled_ratio < 0:
            raise DplError(f"--unlabeled-ratio must be >= 0, got {unlabeled_ratio}")
        self.labeled = labeled
        self.unlabeled = unlabeled
        self.ratio = float(unlabeled_ratio) if len(unlabeled) else 0.0
        length = len(labeled)
        if self.ratio > 0:
            length = max(length, math.ceil(len(unlabeled) / self.ratio))
        self.length = length if len(labeled) else 0

    def __len__(self) -> int:
        return self.length

    def unlabeled_indices(self, index: int) -> list[int]:
        """Indices into the unlabeled set that item ``index`` carries."""
        first, last = math.floor(index * self.ratio), math.floor((index + 1) * self.ratio)
        return [j % len(self.unlabeled) for j in range(first, last)]

    def __getitem__(self, index: int) -> list[Sample | None]:
        samples = [self.labeled[index % len(self.labeled)]]
        samples += [self.unlabeled[j] for j in self.unlabeled_indices(index)]
        return samples


def collate_student(batch: list[list[Sample | None]]) -> tuple[list[torch.Tensor], list[Target]]:
    """Flatten items into lists of images and targets (unreadable images dropped)."""
    return collate_detection([sample for item in batch for sample in item])
