"""What a detector sees in training: augmented samples drawn with their box sets.

``dpl show --augment`` draws a grid of training samples exactly as the teacher's or the
student's DataLoader serves them (``dpl_tools.data.augment``: flip, colour op, affine,
Cutout; mixup and mosaic of pseudo-labeled images) and, with ``train_crop``, cut to a
training window as the detector's transform cuts them, so a user can check that the boxes
still sit on their objects and that the augmentation is not too strong.

Colours: classification boxes (ground truth, or kept pseudo labels) green; regression
pseudo labels cyan; ignore regions grey, dashed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from dpl_tools.report.draw import dashed_rectangle, draw_label
from dpl_tools.runtime import seed_everything

CLASS_COLOUR = (60, 230, 60)  # green: boxes and labels that train classification
REG_COLOUR = (0, 230, 255)  # cyan: regression pseudo labels
IGNORE_COLOUR = (170, 170, 170)  # grey, dashed: ignore regions
CELL = 320  # px: the long side of one sample in the grid


def draw_sample(
    image: torch.Tensor, target: dict[str, Any], names: dict[int, str], cell: int = CELL
) -> Image.Image:
    """One augmented sample (float CHW 0..1 image, target with ``boxes``/``labels`` and
    optionally ``reg_boxes``/``ignore_boxes``), scaled so its long side is ``cell``."""
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    picture = Image.fromarray(array).convert("RGB")
    scale = cell / max(picture.size)
    picture = picture.resize(
        (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    )
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=11)
    for box in target.get("ignore_boxes", torch.zeros(0, 4)).tolist():
        dashed_rectangle(draw, [v * scale for v in box], IGNORE_COLOUR, 1, dash=4)
    for box in target.get("reg_boxes", torch.zeros(0, 4)).tolist():
        draw.rectangle([v * scale for v in box], outline=REG_COLOUR, width=1)
    labels = target.get("labels", torch.zeros(0, dtype=torch.long)).tolist()
    for box, label in zip(target["boxes"].tolist(), labels, strict=True):
        scaled = [v * scale for v in box]
        draw.rectangle(scaled, outline=CLASS_COLOUR, width=2)
        text = names.get(int(label), f"class {label}")
        draw_label(draw, picture.size, (scaled[0], scaled[1]), text, CLASS_COLOUR, font, True)
    caption = "pseudo-labeled" if target.get("pseudo") else "labeled"
    draw_label(draw, picture.size, (0, picture.height), caption, (255, 255, 255), font, True)
    return picture


def sample_grid(pictures: Sequence[Image.Image], columns: int = 4, gap: int = 4) -> Image.Image:
    """The pictures tiled row by row on a dark background."""
    if not pictures:
        raise ValueError("no samples to draw")
    columns = max(1, min(columns, len(pictures)))
    rows = -(-len(pictures) // columns)
    cell_w = max(p.width for p in pictures)
    cell_h = max(p.height for p in pictures)
    grid = Image.new(
        "RGB", (columns * (cell_w + gap) + gap, rows * (cell_h + gap) + gap), (30, 30, 30)
    )
    for k, picture in enumerate(pictures):
        row, col = divmod(k, columns)
        grid.paste(picture, (gap + col * (cell_w + gap), gap + row * (cell_h + gap)))
    return grid


def training_samples(
    ann: str | Path,
    images: str | Path,
    config: dict[str, Any],
    section: str = "student",
    count: int = 8,
    seed: int = 0,
    pseudo: str | Path | None = None,
    unlabeled_images: str | Path | None = None,
) -> tuple[list[tuple[torch.Tensor, dict[str, Any]]], dict[int, str]]:
    """``count`` training samples as the ``section`` (teacher or student) trains on them,
    with its config's augmentation; with ``pseudo`` (student only) every other sample is a
    pseudo-labeled image. Returns the samples and the label -> class name map."""
    from dpl_tools.data.augment import training_augment
    from dpl_tools.data.detection import DetectionDataset
    from dpl_tools.engine.setup import load_train_coco
    from dpl_tools.engine.train_student import load_student_data

    sets: list[Any]
    if section == "student" and pseudo is not None:
        dataset, _ = load_student_data(
            ann, images, pseudo, unlabeled_images, config["student"], verbose=False
        )
        coco, sets = dataset.labeled.coco, [dataset.labeled, dataset.unlabeled]
    else:
        coco = load_train_coco(ann, images, None, verbose=False)
        sets = [DetectionDataset(coco, images, training_augment(config[section], section))]
    names = {i + 1: c["name"] for i, c in enumerate(coco.categories)}
    seed_everything(seed)
    samples = []
    for k in range(count * 3):  # unreadable images are skipped (None)
        if len(samples) == count:
            break
        source = sets[k % len(sets)]
        if not len(source):
            continue
        sample = source[int(torch.randint(len(source), (1,)))]
        if sample is not None:
            samples.append(sample)
    if config[section].get("train_crop"):
        samples = [training_window(*sample, config, section) for sample in samples]
    return samples, names


def training_window(
    image: torch.Tensor, target: dict[str, Any], config: dict[str, Any], section: str
) -> tuple[torch.Tensor, dict[str, Any]]:
    """A served sample as the detector's own transform passes it on in training when the
    section sets ``train_crop``: resized (multi-scale) and cut to a random window."""
    from dpl_tools.models.detector import multiscale_sizes
    from dpl_tools.models.transform import DetectorTransform

    model, train = config["model"], config[section]
    sizes = multiscale_sizes(model["min_size"], train["multiscale"])
    sizes = sizes if isinstance(sizes, tuple) else (sizes,)
    transform = DetectorTransform(sizes, model["max_size"], [0.0] * 3, [1.0] * 3)
    transform.train_crop, transform.min_visible = train["train_crop"], train["aug_min_visible"]
    transform.cut_to_ignore = section == "student"
    return transform.train().resize(image, dict(target))
