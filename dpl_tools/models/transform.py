"""The detector's resize/normalise transform: every box set of a target, and training crops.

torchvision's ``GeneralizedRCNNTransform`` resizes an image with its target's ``boxes``.
``DetectorTransform`` also resizes every other ``*boxes`` key (the student's regression
pseudo labels and ignore regions) and, in training with ``train_crop`` set, takes a random
``train_crop`` x ``train_crop`` window of each resized image. A crop keeps the test scale
(objects as large as at inference) while a step costs what a small image costs, which is
what a set of large images with small objects needs on CPU (DeepPCB: 640 px scans, 35 px
defects). Boxes move with the window; a box left with less than ``min_visible`` of its
area inside leaves its set, the rule of the augmentation's affine
(``dpl_tools.data.augment.clip_to_image``): for the student it becomes an ignore region,
the teacher drops it. Inference always sees the whole image.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

from dpl_tools.data.augment import add_ignore_regions, box_sets, clip_to_image


class DetectorTransform(GeneralizedRCNNTransform):
    """torchvision's transform, resizing every ``*boxes`` key of a target, with optional
    random training crops (``train_crop`` px square, ``None``: whole images)."""

    train_crop: int | None = None
    min_visible: float = 0.3
    cut_to_ignore: bool = False  # the student: boxes mostly cut off become ignore regions

    def resize(
        self, image: Tensor, target: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        original_size = list(image.shape[-2:])
        image, target = super().resize(image, target)
        if target is None:
            return image, target
        for key in [k for k in box_sets(target) if k != "boxes"]:
            target[key] = resize_boxes(target[key], original_size, list(image.shape[-2:]))
        if self.training and self.train_crop:
            image, target = self.crop(image, target)
        return image, target

    def crop(self, image: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """A random ``train_crop`` window of a resized image (each side at most the
        image's), every box set shifted into it and clipped; a box mostly cut off leaves
        its set, for an ignore region when ``cut_to_ignore`` (the student). The window's
        centre is drawn uniformly over the image and the window then pushed inside it, so
        a border pixel is in a window as often as ``train_crop / (2 x side)``, not almost
        never (uniform corners). Draws from torch's global generator: seeded runs repeat."""
        height, width = image.shape[-2:]
        crop_h, crop_w = min(self.train_crop, height), min(self.train_crop, width)
        if (crop_h, crop_w) == (height, width):
            return image, target
        centre = torch.rand(2) * torch.tensor([height, width])
        top = min(max(round(float(centre[0]) - crop_h / 2), 0), height - crop_h)
        left = min(max(round(float(centre[1]) - crop_w / 2), 0), width - crop_w)
        target = dict(target)
        cut = []
        for key in box_sets(target):
            shift = target[key].new_tensor([left, top, left, top])
            target[key] = target[key].reshape(-1, 4) - shift
            cut.append(clip_to_image(target, key, (crop_h, crop_w), self.min_visible))
        if self.cut_to_ignore:
            add_ignore_regions(target, cut)
        return image[:, top : top + crop_h, left : left + crop_w], target


def detector_transform(transform: GeneralizedRCNNTransform) -> DetectorTransform:
    """A ``DetectorTransform`` with ``transform``'s sizes and normalisation (and, when it
    is one, its crop settings)."""
    out = DetectorTransform(
        transform.min_size,
        transform.max_size,
        transform.image_mean,
        transform.image_std,
        size_divisible=transform.size_divisible,
        fixed_size=transform.fixed_size,
    )
    if isinstance(transform, DetectorTransform):
        out.train_crop, out.min_visible = transform.train_crop, transform.min_visible
        out.cut_to_ignore = transform.cut_to_ignore
    return out.train(transform.training)


def set_train_crop(model: nn.Module, train_crop: int | None, min_visible: float = 0.3) -> None:
    """Train ``model`` (a torchvision detector) on random ``train_crop`` windows of its
    resized images (None: whole images); in place, state dict unchanged."""
    if not isinstance(model.transform, DetectorTransform):
        model.transform = detector_transform(model.transform)
    model.transform.train_crop, model.transform.min_visible = train_crop, min_visible
