"""The student's training data: labeled images with ground truth plus pseudo-labeled images.

``PseudoLabeledDataset`` serves unlabeled images with their detector targets, built by
the student criterion's ``student_target`` (``dpl_tools.models.student_criterion``: which
pseudo labels feed which loss), augmented with the image (every box set together,
``dpl_tools.data.augment``), optionally mixed up or tiled into mosaics with other
pseudo-labeled images, and marked ``pseudo=True``.
``StudentDataset`` pairs the two sets so that each item holds one labeled image and, on
average, ``unlabeled_ratio`` pseudo-labeled images.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from dpl_tools.data.augment import DetectionAugment, mix_samples
from dpl_tools.data.coco import CocoData
from dpl_tools.data.detection import (
    DetectionDataset,
    Target,
    collate_detection,
    image_tensor,
    report_skipped,
)
from dpl_tools.data.images import ImageReadError
from dpl_tools.data.pseudo_labels import META_CATEGORIES
from dpl_tools.data.pseudo_targets import PseudoImage
from dpl_tools.errors import DplError

Sample = tuple[torch.Tensor, Target]


def check_pseudo_categories(
    meta: dict, used: Iterable[int], coco: CocoData, pseudo_path: str | Path
) -> None:
    """The pseudo labels' classes (file metadata, and the category ids ``used`` by the
    student's supervision) must be the labeled set's COCO categories; raises a one-line
    DplError naming the file otherwise."""
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
    unknown = sorted(set(used) - ours.keys())
    if unknown:
        raise DplError(
            f"{pseudo_path}: pseudo labels use category id(s) {unknown} that {coco.path} "
            "does not define"
        )


class PseudoLabeledDataset(Dataset):
    """Unlabeled images ``items`` with their detector ``targets`` (one per item, from
    ``student_target``), transformed by ``augment`` (every box set with the image; None:
    as stored). With probability ``mosaic`` an item is a 2 x 2 mosaic of itself and three
    random others, else with ``mixup`` a mixup with one (MixPL), each part augmented."""

    def __init__(
        self,
        items: list[PseudoImage],
        targets: list[dict[str, torch.Tensor]],
        images_dir: str | Path,
        augment: DetectionAugment | None = None,
        mixup: float = 0.0,
        mosaic: float = 0.0,
    ) -> None:
        if len(items) != len(targets):
            raise ValueError(f"{len(items)} pseudo-labeled images but {len(targets)} targets")
        self.items = items
        self.targets = targets
        self.images_dir = Path(images_dir)
        self.augment = augment
        self.mixup, self.mosaic = float(mixup), float(mosaic)

    def __len__(self) -> int:
        return len(self.items)

    def _sample(self, index: int) -> Sample | None:
        path = self.images_dir / self.items[index].file_name
        try:
            image = image_tensor(path)
        except ImageReadError as e:
            report_skipped(path, e.reason)
            return None
        target: Target = dict(self.targets[index])
        if self.augment is not None:
            image, target = self.augment(image, target)
        return image, target

    def _others(self, count: int) -> list[Sample]:
        """``count`` readable random items to mix with (an unreadable one is redrawn)."""
        out: list[Sample] = []
        for _ in range(10 * count):
            if len(out) == count:
                break
            sample = self._sample(int(torch.randint(len(self), (1,))))
            if sample is not None:
                out.append(sample)
        if len(out) < count:
            raise DplError(f"{self.images_dir}: too few readable images to mix")
        return out

    def __getitem__(self, index: int) -> Sample | None:
        sample = self._sample(index)
        if sample is None:
            return None
        image, target = mix_samples(sample, self._others, self.mixup, self.mosaic)
        target["pseudo"] = True
        return image, target


def missing_images(items: list[PseudoImage], images_dir: str | Path) -> list[str]:
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
