"""Training augmentation of a detector image together with every box set of its target.

A target may hold several box sets: ``boxes`` (classification, with ``labels``),
``reg_boxes`` (regression pseudo labels, with ``reg_labels``) and ``ignore_boxes``
(ignore regions). ``DetectionAugment`` moves all of them with the image in one call, on
torchvision.transforms.v2 with ``tv_tensors.BoundingBoxes``:

- ``weak``: a random horizontal flip (the detector's own transform adds the multi-scale
  resize), exactly the flip dpl always used, so a weak run reproduces earlier ones;
- ``strong`` (STAC / Soft Teacher): the flip, one colour op (photometric distortion by
  default, or STAC's RandAugment list), a global affine (scale jitter and a small
  translation), then Cutout patches of random pixels.

Boxes the affine pushes mostly out of the image (less than ``min_visible`` of their area
left) and boxes the patches mostly cover (at least ``erase_drop`` of their area erased)
leave their box set. For the student (``cut_to_ignore``) they become ignore regions: what
is left of the object is neither taught as an object nor as background. The teacher's
torchvision heads have no ignore regions, so there they are dropped. Ignore regions
themselves stay while any pixel of them is in the image. Mixup and mosaic of
pseudo-labeled images (MixPL) are ``mix_samples``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from dpl_tools.defaults import AUGMENTS
from dpl_tools.errors import DplError

FILL = 0.5  # grey: what an affine's empty border and a Cutout patch show
LABELS_OF = {"boxes": "labels", "reg_boxes": "reg_labels"}  # box set -> its label vector
IGNORE_BOXES = "ignore_boxes"  # the student's ignore regions (student_criterion.IGNORE_KEY)
MIN_SIDE = 1.0  # px: a box thinner than this after clipping is dropped

Target = dict[str, Any]


@dataclass(frozen=True)
class AugmentSettings:
    """The ``augment`` keys of a teacher or student config section (see defaults.py)."""

    hflip: bool = True
    colour_prob: float = 1.0
    colour_ops: str = "photometric"
    scale: tuple[float, float] = (0.6, 1.4)
    translate: float = 0.1
    geometric_prob: float = 1.0
    erase_patches: tuple[int, int] = (1, 5)
    erase_size: tuple[float, float] = (0.05, 0.2)
    erase_fill: str = "noise"
    erase_drop: float = 0.7
    min_visible: float = 0.3

    @classmethod
    def from_config(cls, section: Mapping[str, Any], name: str = "student") -> AugmentSettings:
        """Settings from a config section's ``aug_*`` keys (and ``hflip``); a ``[low,
        high]`` pair out of order is a one-line DplError naming ``name.key``."""
        values = {k: section[f"aug_{k}"] for k in cls.__dataclass_fields__ if f"aug_{k}" in section}
        if "hflip" in section:
            values["hflip"] = bool(section["hflip"])
        for key in ("scale", "erase_patches", "erase_size"):
            if key not in values:
                continue
            pair = tuple(values[key])
            if len(pair) != 2 or pair[0] > pair[1]:
                raise DplError(
                    f"{name}.aug_{key}: expected [low, high] with low <= high, got {list(pair)}"
                )
            values[key] = pair
        return cls(**values)


def colour_ops(kind: str = "photometric") -> list[v2.Transform]:
    """The colour ops, one of which is applied per image: ``photometric`` (brightness,
    contrast, saturation, hue: mmdet's PhotoMetricDistortion) or ``randaugment`` (those and
    STAC's RandAugment ops: sharpness, autocontrast, equalize, posterize, solarize,
    greyscale; on the demo bench's validation set they collapsed a 50-image detector)."""
    photometric = [
        v2.ColorJitter(brightness=0.4),
        v2.ColorJitter(contrast=0.4),
        v2.ColorJitter(saturation=0.6),
        v2.ColorJitter(hue=0.05),
    ]
    if kind == "photometric":
        return photometric
    return [
        *photometric,
        v2.RandomAdjustSharpness(2.0, p=1.0),
        v2.RandomAutocontrast(p=1.0),
        v2.RandomEqualize(p=1.0),
        v2.RandomPosterize(bits=4, p=1.0),
        v2.RandomSolarize(threshold=0.7, p=1.0),
        v2.Grayscale(num_output_channels=3),
    ]


def box_sets(target: Target) -> list[str]:
    """The keys of ``target`` that hold xyxy boxes."""
    return [k for k in target if k.endswith("boxes")]


def _area(boxes: Tensor) -> Tensor:
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def _keep(target: Target, key: str, keep: Tensor) -> None:
    """Keep rows ``keep`` of box set ``key`` and of its label vector."""
    target[key] = target[key][keep]
    labels = LABELS_OF.get(key)
    if labels in target:
        target[labels] = target[labels][keep]


def erase_patches(
    image: Tensor, settings: AugmentSettings, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Cutout: paint 1..n rectangular patches, of uniform random pixels (``erase_fill``
    noise: unlike any object, where a flat grey patch can look like a plain object) or
    grey; returns the image and the patches' xyxy boxes (sides are ``erase_size``
    fractions of the image's sides)."""
    height, width = image.shape[-2:]
    low, high = settings.erase_patches
    count = int(torch.randint(low, high + 1, (1,), generator=generator))
    image = image.clone()
    patches = []
    for _ in range(count):
        lo, hi = settings.erase_size
        side = torch.empty(2).uniform_(lo, hi, generator=generator)
        ph, pw = max(1, round(float(side[0]) * height)), max(1, round(float(side[1]) * width))
        y0 = int(torch.randint(0, max(1, height - ph + 1), (1,), generator=generator))
        x0 = int(torch.randint(0, max(1, width - pw + 1), (1,), generator=generator))
        if settings.erase_fill == "noise":
            shape = (*image.shape[:-2], ph, pw)
            fill = torch.rand(shape, generator=generator, dtype=image.dtype)
            image[..., y0 : y0 + ph, x0 : x0 + pw] = fill
        else:
            image[..., y0 : y0 + ph, x0 : x0 + pw] = FILL
        patches.append([x0, y0, x0 + pw, y0 + ph])
    return image, torch.tensor(patches, dtype=torch.float32).reshape(-1, 4)


def erased_fraction(boxes: Tensor, patches: Tensor, size: tuple[int, int]) -> Tensor:
    """The fraction of each box's area that the (possibly overlapping) patches cover."""
    if not len(boxes):
        return torch.zeros(0, device=boxes.device)
    height, width = size
    mask = torch.zeros(height + 1, width + 1, device=boxes.device)  # the online loop's: on GPU
    for x0, y0, x1, y1 in patches.round().long().tolist():
        mask[y0:y1, x0:x1] = 1.0
    integral = mask[:height, :width].cumsum(0).cumsum(1)
    integral = torch.nn.functional.pad(integral, (1, 0, 1, 0))
    b = boxes.clone()
    b[:, [0, 2]] = b[:, [0, 2]].clamp(0, width)
    b[:, [1, 3]] = b[:, [1, 3]].clamp(0, height)
    b = b.round().long()
    x0, y0, x1, y1 = b.unbind(1)
    covered = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return covered / _area(b.float()).clamp(min=1.0)


def clip_to_image(
    target: Target,
    key: str,
    size: Sequence[int],
    min_visible: float,
    valid: Tensor | None = None,
) -> Tensor:
    """Clip box set ``key`` of a moved (shifted, scaled, cropped) image's target to the
    image (``size``: h, w) and drop the boxes left thinner than a pixel or with less than
    ``min_visible`` of their moved area inside (and the rows not ``valid``, if given); an
    ignore region stays while any of it is inside. Returns the clipped boxes dropped for
    visibility alone: a caller whose loss has ignore regions makes them ignore regions
    (``add_ignore_regions``), so an object's visible sliver is not taught as background."""
    if key == IGNORE_BOXES:
        min_visible = 0.0
    height, width = size
    boxes = target[key]
    moved_area = _area(boxes)
    boxes = torch.stack(
        [boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
         boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)], dim=1,
    ).reshape(-1, 4)  # fmt: skip
    target[key] = boxes
    visible = _area(boxes) / moved_area.clamp(min=1e-6) >= min_visible
    wide = (boxes[:, 2] - boxes[:, 0] >= MIN_SIDE) & (boxes[:, 3] - boxes[:, 1] >= MIN_SIDE)
    if valid is not None:
        wide = wide & valid
    _keep(target, key, wide & visible)
    return boxes[wide & ~visible]


def add_ignore_regions(target: Target, boxes: Sequence[Tensor]) -> None:
    """Append ``boxes`` (e.g. objects mostly cut out of a training view) to the target's
    ignore regions (``ignore_boxes``), creating the set when the target has none."""
    boxes = [b.reshape(-1, 4) for b in boxes if len(b)]
    if boxes:
        ignore = target.get(IGNORE_BOXES)
        target[IGNORE_BOXES] = torch.cat([*([ignore.reshape(-1, 4)] if ignore is not None else []),
                                          *[b.to(boxes[0]) for b in boxes]])  # fmt: skip


class DetectionAugment:
    """``augment(image, target) -> (image, target)`` for training: the image (float CHW,
    0..1) and every box set of the target transformed together; dropped boxes leave with
    their labels. Randomness comes from torch's global generator, so ``seed_everything``
    (and DataLoader worker seeding) makes it reproducible."""

    def __init__(
        self,
        kind: str = "weak",
        settings: AugmentSettings | None = None,
        cut_to_ignore: bool = False,
    ) -> None:
        if kind not in AUGMENTS:
            raise ValueError(f"unknown augment {kind!r} (choose from {', '.join(AUGMENTS)})")
        self.kind = kind
        self.cut_to_ignore = cut_to_ignore
        self.settings = settings or AugmentSettings()
        s = self.settings
        self.flip = v2.RandomHorizontalFlip(0.5) if s.hflip else None
        self.colour = v2.RandomApply([v2.RandomChoice(colour_ops(s.colour_ops))], p=s.colour_prob)
        affine = v2.RandomAffine(
            degrees=0.0, translate=(s.translate, s.translate), scale=s.scale, fill=FILL
        )
        self.geometric = v2.RandomApply([affine], p=s.geometric_prob)

    def __repr__(self) -> str:
        return f"DetectionAugment({self.kind!r}, {self.settings})"

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        # in float32 even inside the training step's autocast (the online loop augments
        # there): under autocast the affine's sampling grid and box matmul come out float16,
        # which rounds the image to 0/1 and overflows the areas of large boxes
        with torch.autocast(image.device.type, enabled=False):
            return self._augment(image, target)

    def _augment(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        target = dict(target)
        keys = box_sets(target)
        size = tuple(image.shape[-2:])
        boxed = {
            k: tv_tensors.BoundingBoxes(
                target[k].float().reshape(-1, 4), format="XYXY", canvas_size=size,
                clamping_mode=None,
            )
            for k in keys
        }  # fmt: skip
        picture = tv_tensors.Image(image)
        if self.flip is not None:
            picture, boxed = self.flip(picture, boxed)
        if self.kind == "strong":
            picture = self.colour(picture)
            before = {k: _area(b.as_subclass(Tensor)) for k, b in boxed.items()}
            picture, boxed = self.geometric(picture, boxed)
            cut = []
            for k in keys:
                target[k] = boxed[k].as_subclass(Tensor)
                cut.append(clip_to_image(target, k, size, self.settings.min_visible, before[k] > 0))
            erased, patches = erase_patches(picture.as_subclass(Tensor), self.settings)
            for k in keys:
                if k == IGNORE_BOXES:
                    continue  # an ignore region stays one, erased or not
                gone = erased_fraction(target[k], patches, size) >= self.settings.erase_drop
                cut.append(target[k][gone])
                _keep(target, k, ~gone)
            if self.cut_to_ignore:
                add_ignore_regions(target, cut)
            return erased, target
        for k in keys:
            target[k] = boxed[k].as_subclass(Tensor)
        return picture.as_subclass(Tensor), target


def training_augment(
    section: Mapping[str, Any], name: str, key: str = "augment"
) -> DetectionAugment:
    """The training augmentation a config section asks for: ``section[key]`` (weak or
    strong; the student's ``pseudo_augment``, null meaning its ``augment``) with the
    section's ``aug_*`` settings. The student's loss has ignore regions, so its boxes
    mostly cut out of a view become ignore regions; the teacher's are dropped."""
    kind = section[key] or section["augment"]
    settings = AugmentSettings.from_config(section, name)
    return DetectionAugment(kind, settings, cut_to_ignore=name == "student")


def _resized(image: Tensor, target: Target, size: Sequence[int]) -> tuple[Tensor, Target]:
    """``image`` resized to ``size`` (h, w), its box sets scaled with it."""
    height, width = image.shape[-2:]
    if (height, width) == tuple(size):
        return image, dict(target)
    out = dict(target)
    sx, sy = size[1] / width, size[0] / height
    for k in box_sets(target):
        out[k] = target[k] * torch.tensor([sx, sy, sx, sy])
    return F.resize(image, list(size), antialias=True), out


def _merge_targets(parts: Sequence[Target]) -> Target:
    """One target holding the box sets (and label vectors) of all ``parts``."""
    merged = dict(parts[0])
    keys = [k for k in parts[0] if k in LABELS_OF or k in LABELS_OF.values()]
    keys += [k for k in box_sets(parts[0]) if k not in keys]
    for key in keys:
        merged[key] = torch.cat([p[key] for p in parts if key in p])
    return merged


def mixup(a: tuple[Tensor, Target], b: tuple[Tensor, Target], lam: float) -> tuple[Tensor, Target]:
    """MixPL mixup: ``lam * a + (1 - lam) * b`` (b resized to a's size) with both images'
    box sets, each at full weight."""
    image_a, target_a = a
    image_b, target_b = _resized(*b, image_a.shape[-2:])
    return lam * image_a + (1 - lam) * image_b, _merge_targets([target_a, target_b])


def mosaic(samples: Sequence[tuple[Tensor, Target]]) -> tuple[Tensor, Target]:
    """Mosaic of 4: each image resized to the first one's size and tiled 2 x 2."""
    if len(samples) != 4:
        raise ValueError(f"a mosaic needs 4 images, got {len(samples)}")
    height, width = samples[0][0].shape[-2:]
    canvas = samples[0][0].new_full((samples[0][0].shape[0], 2 * height, 2 * width), FILL)
    parts = []
    for i, sample in enumerate(samples):
        image, target = _resized(*sample, (height, width))
        dy, dx = (i // 2) * height, (i % 2) * width
        canvas[:, dy : dy + height, dx : dx + width] = image
        shift = torch.tensor([dx, dy, dx, dy], dtype=torch.float32)
        parts.append({**target, **{k: target[k] + shift for k in box_sets(target)}})
    return canvas, _merge_targets(parts)


def mix_samples(
    first: tuple[Tensor, Target],
    draw: Callable[[int], list[tuple[Tensor, Target]]],
    mixup_prob: float,
    mosaic_prob: float,
) -> tuple[Tensor, Target]:
    """With probability ``mosaic_prob`` a mosaic of ``first`` and 3 samples from
    ``draw(3)``, else with ``mixup_prob`` a mixup with one (Beta(1.5, 1.5) weight);
    otherwise ``first`` unchanged."""
    if mosaic_prob > 0 and float(torch.rand(1)) < mosaic_prob:
        return mosaic([first, *draw(3)])
    if mixup_prob > 0 and float(torch.rand(1)) < mixup_prob:
        lam = float(torch.distributions.Beta(1.5, 1.5).sample())
        return mixup(first, draw(1)[0], lam)
    return first
