"""Test-time augmentation (TTA) of the teacher: a horizontal flip and extra test scales.

Each augmentation is one more teacher pass over the batch; its detections are mapped back
to the original image (a flipped pass's boxes are un-flipped, a rescaled pass's boxes
come back in original pixels through torchvision's postprocess) and all passes, the plain
one included, are fused with weighted box fusion (``box_fusion``). A baseline a user
would reach for, and an input the polisher may refine.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.models.detection import FasterRCNN

from dpl_tools.engine.box_fusion import weighted_box_fusion


@dataclass(frozen=True)
class Augmentation:
    """One extra teacher pass: test scale (x the model's min_size and max_size) and flip."""

    scale: float = 1.0
    hflip: bool = False


def tta_augmentations(scales: Sequence[float]) -> list[Augmentation]:
    """The extra passes of ``--tta``: the flipped image, and each scale of ``scales``."""
    return [Augmentation(hflip=True), *(Augmentation(scale=float(s)) for s in scales)]


def hflip_images(images: list[Tensor]) -> list[Tensor]:
    """CHW images mirrored left to right."""
    return [im.flip(-1) for im in images]


def unflip_boxes(boxes: Tensor, width: int | float) -> Tensor:
    """xyxy boxes found on a horizontally flipped image of ``width`` px, in the original
    image's coordinates (x1' = W - x2, x2' = W - x1)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([width - x2, y1, width - x1, y2], dim=-1)


@contextmanager
def at_test_scale(teacher: FasterRCNN, scale: float) -> Iterator[None]:
    """The teacher resizing images to ``scale`` x its test min_size (and max_size) inside
    the block; the sizes are restored afterwards."""
    transform = teacher.transform
    min_size, max_size = transform.min_size, transform.max_size
    if scale != 1.0:
        transform.min_size = (max(1, round(min_size[-1] * scale)),)
        transform.max_size = max(1, round(max_size * scale))
    try:
        yield
    finally:
        transform.min_size, transform.max_size = min_size, max_size


def augmented_detections(
    teacher: FasterRCNN, images: list[Tensor], augmentation: Augmentation
) -> list[dict[str, Tensor]]:
    """The teacher's detections on augmented ``images``, boxes in original image pixels."""
    inputs = hflip_images(images) if augmentation.hflip else images
    with at_test_scale(teacher, augmentation.scale):
        detections = teacher(inputs)
    out = []
    for image, d in zip(images, detections, strict=True):
        boxes = d["boxes"].float()
        if augmentation.hflip:
            boxes = unflip_boxes(boxes, image.shape[-1])
        out.append({"boxes": boxes, "scores": d["scores"].float(), "labels": d["labels"]})
    return out


def fuse_passes(
    passes: list[list[dict[str, Tensor]]], iou_thresh: float, max_detections: int
) -> list[dict[str, Tensor]]:
    """Per image, the weighted box fusion of every pass's detections (same coordinates),
    at most ``max_detections`` by descending fused score."""
    fused = []
    for per_image in zip(*passes, strict=True):
        boxes, scores, labels = weighted_box_fusion(
            [d["boxes"] for d in per_image],
            [d["scores"] for d in per_image],
            [d["labels"] for d in per_image],
            iou_thresh,
        )
        fused.append(
            {
                "boxes": boxes[:max_detections],
                "scores": scores[:max_detections],
                "labels": labels[:max_detections],
            }
        )
    return fused
