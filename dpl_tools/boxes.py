"""Box geometry of the method: context ("vote") boxes, delta coding, clipping.

Boxes are ``(x1, y1, x2, y2)`` float tensors. Delta coding is the standard Faster R-CNN
xywh coding with means 0 and stds 1 (torchvision's ``BoxCoder`` with weights 1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder

VOTE_FACTOR = 0.06  # f of the paper: shift / enlargement as a fraction of w and h
NUM_VOTE_BOXES = 7  # the box itself + 4 diagonal shifts + 2 enlargements

# Clamp for dw/dh before exp, as torchvision does (log(1000/16)).
_BBOX_XFORM_CLIP = math.log(1000.0 / 16)
_CODER = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0), bbox_xform_clip=_BBOX_XFORM_CLIP)


def vote_boxes(boxes: Tensor, factor: float = VOTE_FACTOR) -> Tensor:
    """The 7 context boxes of each box: ``(N, 4) -> (N, 7, 4)``.

    Order: the box itself; shifted by (-fw, -fh), (+fw, -fh), (-fw, +fh), (+fw, +fh)
    (up-left, up-right, down-left, down-right; all four coordinates move together);
    enlarged by fw / fh on every side; enlarged by 2fw / 2fh on every side.
    w and h are clamped to >= 1 px before scaling.
    """
    w = (boxes[:, 2] - boxes[:, 0]).clamp(min=1.0)
    h = (boxes[:, 3] - boxes[:, 1]).clamp(min=1.0)
    dx, dy = factor * w, factor * h
    zero = torch.zeros_like(dx)
    shift = torch.stack(
        [
            torch.stack([zero, zero, zero, zero], 1),
            torch.stack([-dx, -dy, -dx, -dy], 1),
            torch.stack([dx, -dy, dx, -dy], 1),
            torch.stack([-dx, dy, -dx, dy], 1),
            torch.stack([dx, dy, dx, dy], 1),
            torch.stack([-dx, -dy, dx, dy], 1),
            torch.stack([-2 * dx, -2 * dy, 2 * dx, 2 * dy], 1),
        ],
        dim=1,
    )
    return boxes[:, None, :] + shift


def encode_deltas(targets: Tensor, boxes: Tensor) -> Tensor:
    """(dx, dy, dw, dh) that move ``boxes`` onto ``targets`` (both ``(N, 4)``)."""
    if boxes.numel() == 0:
        return boxes.new_zeros((0, 4))
    return _CODER.encode_single(targets, boxes)


def decode_deltas(deltas: Tensor, boxes: Tensor) -> Tensor:
    """Apply ``(N, 4)`` deltas to ``(N, 4)`` boxes (inverse of ``encode_deltas``)."""
    if boxes.numel() == 0:
        return boxes.new_zeros((0, 4))
    return _CODER.decode_single(deltas, boxes)


def clip_boxes(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Clip boxes to an image of ``(height, width)``."""
    h, w = image_size
    x = boxes[..., 0::2].clamp(0, w)
    y = boxes[..., 1::2].clamp(0, h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)
