"""The two polishing networks of the paper, and the ``Polisher`` that runs them.

Both read RoI features that the teacher's own multi-scale RoI pooler takes from the
teacher's frozen FPN features: 256x7x7 per box.

* ``RegressionPolisher``: the features of a box's 7 vote boxes, concatenated along
  channels (1792) -> 1x1 conv 256 -> ReLU -> FC 1024 -> ReLU -> FC 1024 -> ReLU -> FC 4
  (dx, dy, dw, dh deltas relative to the box). Trained with GIoU loss.
* ``ClassificationPolisher``: the feature of the box itself -> FC 1024 -> ReLU -> FC 1024
  -> FC (C+1), softmax over background + C classes. Trained with cross-entropy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.ops import MultiScaleRoIAlign

from dpl_tools.boxes import NUM_VOTE_BOXES, VOTE_FACTOR, clip_boxes, decode_deltas, vote_boxes
from dpl_tools.errors import DplError
from dpl_tools.io import sha256_file
from dpl_tools.models.checkpoint import read_payload, write_payload

FEATURE_CHANNELS = 256
POOL_SIZE = 7
HIDDEN = 1024
FORMAT = "dpl-polisher"
FORMAT_VERSION = 1


class RegressionPolisher(nn.Module):
    """Refines a box from the RoI features of its 7 vote boxes: ``(N, 7, 256, 7, 7) -> (N, 4)``."""

    def __init__(self, num_votes: int = NUM_VOTE_BOXES, channels: int = FEATURE_CHANNELS) -> None:
        super().__init__()
        self.fuse = nn.Conv2d(num_votes * channels, channels, kernel_size=1)
        self.fc1 = nn.Linear(channels * POOL_SIZE * POOL_SIZE, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.delta = nn.Linear(HIDDEN, 4)
        # Start close to the identity (zero deltas), as Faster R-CNN's box predictor does.
        nn.init.normal_(self.delta.weight, std=0.001)
        nn.init.zeros_(self.delta.bias)

    def forward(self, vote_features: Tensor) -> Tensor:
        x = vote_features.flatten(1, 2)  # (N, 7*256, 7, 7): channel concat, box order kept
        x = torch.relu(self.fuse(x)).flatten(1)
        x = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        return self.delta(x)


class ClassificationPolisher(nn.Module):
    """Classifies a box from its own RoI feature: ``(N, 256, 7, 7) -> (N, C+1)`` logits."""

    def __init__(self, num_classes: int, channels: int = FEATURE_CHANNELS) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels * POOL_SIZE * POOL_SIZE, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.cls = nn.Linear(HIDDEN, num_classes + 1)

    def forward(self, features: Tensor) -> Tensor:
        return self.cls(self.fc2(torch.relu(self.fc1(features.flatten(1)))))


def teacher_roi_pool(teacher: FasterRCNN) -> MultiScaleRoIAlign:
    """The teacher's own multi-scale RoI pooler (256x7x7 per box from its FPN levels)."""
    return teacher.roi_heads.box_roi_pool


class Polisher(nn.Module):
    """Both polishing networks plus the vote-box feature extraction they share."""

    def __init__(
        self,
        num_classes: int,
        vote_factor: float = VOTE_FACTOR,
        featmap_names: list[str] | None = None,
        sampling_ratio: int = 2,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.vote_factor = vote_factor
        # Same configuration as the teacher's pooler (see ``for_teacher``); it has no weights.
        self.roi_pool = MultiScaleRoIAlign(
            featmap_names or ["0", "1", "2", "3"], POOL_SIZE, sampling_ratio
        )
        self.regression = RegressionPolisher()
        self.classification = ClassificationPolisher(num_classes)

    @classmethod
    def for_teacher(cls, teacher: FasterRCNN, num_classes: int, **kwargs: Any) -> Polisher:
        """A polisher whose RoI pooler is configured exactly as ``teacher``'s."""
        pool = teacher_roi_pool(teacher)
        return cls(
            num_classes,
            featmap_names=list(pool.featmap_names),
            sampling_ratio=pool.sampling_ratio,
            **kwargs,
        )

    def config(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "vote_factor": self.vote_factor,
            "featmap_names": list(self.roi_pool.featmap_names),
            "sampling_ratio": self.roi_pool.sampling_ratio,
        }

    def box_features(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list
    ) -> Tensor:
        """RoI features of boxes (one list entry per image): ``(sum N, 256, 7, 7)``."""
        return self.roi_pool(features, boxes, image_sizes)

    def vote_features(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list
    ) -> Tensor:
        """RoI features of the 7 vote boxes of each box: ``(sum N, 7, 256, 7, 7)``."""
        votes = [vote_boxes(b, self.vote_factor).reshape(-1, 4) for b in boxes]
        pooled = self.roi_pool(features, votes, image_sizes)
        return pooled.reshape(-1, NUM_VOTE_BOXES, *pooled.shape[1:])

    def regress(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list
    ) -> list[Tensor]:
        """Refined boxes (decoded deltas, clipped to the image), one tensor per image."""
        if sum(len(b) for b in boxes) == 0:
            return [b.new_zeros((0, 4)) for b in boxes]
        deltas = self.regression(self.vote_features(features, boxes, image_sizes)).float()
        out, start = [], 0
        for b, size in zip(boxes, image_sizes, strict=True):
            d = deltas[start : start + len(b)]
            start += len(b)
            out.append(clip_boxes(decode_deltas(d, b.float()), tuple(size)))
        return out

    def classify(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list
    ) -> list[Tensor]:
        """Class probabilities ``(N, C+1)`` per image, background at index 0."""
        if sum(len(b) for b in boxes) == 0:
            return [b.new_zeros((0, self.num_classes + 1)) for b in boxes]
        logits = self.classification(self.box_features(features, boxes, image_sizes)).float()
        return list(logits.softmax(dim=1).split([len(b) for b in boxes]))

    def refine(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Both polishers on the teacher's features of a batch: (refined boxes, class probs).

        Boxes are in the teacher's transformed (resized) coordinates, one tensor per image.
        """
        return self.regress(features, boxes, image_sizes), self.classify(
            features, boxes, image_sizes
        )


def save_polisher(
    path: str | Path,
    polisher: Polisher,
    teacher_path: str | Path,
    categories: list[dict],
    extra: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write a polisher checkpoint tied to its teacher (by the teacher file's SHA-256);
    ``train_state``: what a resumed training run needs (periodic checkpoints only)."""
    payload = {
        "teacher_sha256": sha256_file(teacher_path),
        "categories": categories,
        "config": polisher.config(),
        "state_dict": {k: v.detach().cpu() for k, v in polisher.state_dict().items()},
        "extra": extra or {},
    }
    if train_state is not None:
        payload["train_state"] = train_state
    return write_payload(path, FORMAT, FORMAT_VERSION, payload)


def read_polisher_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw polisher checkpoint dict, or a one-line DplError."""
    return read_payload(path, FORMAT, FORMAT_VERSION, "polisher")


def load_polisher(
    path: str | Path, teacher_sha: str | None = None, device: str | torch.device = "cpu"
) -> Polisher:
    """Rebuild a polisher; with ``teacher_sha``, refuse one trained on another teacher.
    ``fitted_thresholds``: the keep thresholds train-polisher fitted (None: not fitted);
    ``noise``: the description of the noise it learned from (None in old checkpoints);
    ``regression_check``: its check on real held-out pairs (None: not checked)."""
    payload = read_polisher_checkpoint(path)
    if teacher_sha is not None and payload["teacher_sha256"] != teacher_sha:
        raise DplError(
            f"{path}: this polisher was trained on teacher {payload['teacher_sha256'][:12]}, "
            f"not on the given teacher ({teacher_sha[:12]}); retrain it with dpl train-polisher"
        )
    polisher = Polisher(**payload["config"])
    polisher.load_state_dict(payload["state_dict"])
    polisher.categories = payload["categories"]
    polisher.fitted_thresholds = (payload.get("extra") or {}).get("keep_thresholds")
    polisher.noise = (payload.get("extra") or {}).get("noise")
    polisher.regression_check = (payload.get("extra") or {}).get("regression_check")
    return polisher.to(device).eval()
