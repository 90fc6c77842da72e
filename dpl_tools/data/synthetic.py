"""A built-in synthetic detection dataset: shapes on textured backgrounds.

Two styles. ``colour`` (the tests' tiny sets): each class is a shape with its own colour
family, so a small detector learns it in minutes on CPU. ``texture`` (``dpl demo``): a
class is a shape *and* a fill (plain or striped), colours are drawn from one palette for
every class, and unlabeled distractors (outlines, crosses, stripes) clutter the
background, so telling classes apart takes shape and texture, the teacher confuses
similar classes and fires on distractors: pseudo labels with errors worth polishing.
Sizes, positions, overlaps and background texture make boxes imperfect in both.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("square", "disc", "triangle")
_BASE_COLOURS = {"square": (200, 60, 50), "disc": (60, 170, 70), "triangle": (60, 80, 200)}
TEXTURE_CLASSES = tuple(f"{fill}{shape}" for fill in ("", "striped ") for shape in CLASSES)
STYLES = ("colour", "texture")


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    base = rng.uniform(90, 170, size=3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    gradient = (xx / max(width, 1) - 0.5) * rng.uniform(-40, 40)
    gradient += (yy / max(height, 1) - 0.5) * rng.uniform(-40, 40)
    noise = rng.normal(0, 12, size=(height, width, 3))
    arr = base[None, None, :] + gradient[..., None] + noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, box: tuple, colour: tuple) -> None:
    x1, y1, x2, y2 = box
    if name == "square":
        draw.rectangle(box, fill=colour)
    elif name == "disc":
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=colour)


def _stripes(img: Image.Image, box: tuple, shape: str, colour: tuple, period: float) -> None:
    """Paint diagonal stripes of ``colour`` inside ``shape`` at ``box`` (masked by the shape)."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    w, h = max(x2 - x1, 1), max(y2 - y1, 1)
    mask = Image.new("L", (w, h), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, (0, 0, w - 1, h - 1), 255)
    yy, xx = np.mgrid[0:h, 0:w]
    on = ((xx + yy) % period) < period / 2
    stripe = np.asarray(mask) * on
    layer = Image.new("RGB", (w, h), colour)
    img.paste(layer, (x1, y1), Image.fromarray(stripe.astype(np.uint8)))


def _distractor(draw: ImageDraw.ImageDraw, rng: np.random.Generator, box: tuple, colour) -> None:
    """An unlabeled object: an outline of a class shape, a cross or a few parallel lines."""
    kind = int(rng.integers(3))
    x1, y1, x2, y2 = box
    width = max(1, round(min(x2 - x1, y2 - y1) / 10))
    if kind == 0:
        shape = CLASSES[int(rng.integers(len(CLASSES)))]
        if shape == "square":
            draw.rectangle(box, outline=colour, width=width)
        elif shape == "disc":
            draw.ellipse(box, outline=colour, width=width)
        else:
            draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], outline=colour, width=width)
    elif kind == 1:
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        draw.line([(x1, cy), (x2, cy)], fill=colour, width=2 * width)
        draw.line([(cx, y1), (cx, y2)], fill=colour, width=2 * width)
    else:
        for y in np.linspace(y1, y2, 4):
            draw.line([(x1, y), (x2, y)], fill=colour, width=width)


def _texture_object(img: Image.Image, rng: np.random.Generator, name: str, box: tuple) -> None:
    """Class ``name`` of the texture style: a shape in a palette colour, striped or plain."""
    striped = name.startswith("striped ")
    shape = name.removeprefix("striped ")
    colour = tuple(int(c) for c in rng.uniform(20, 235, size=3))
    _draw_shape(ImageDraw.Draw(img), shape, box, colour)
    if striped:
        other = tuple(int(255 - c) for c in colour)
        period = max(4.0, min(box[2] - box[0], box[3] - box[1]) / rng.uniform(2.5, 4.0))
        _stripes(img, box, shape, other, period)


def make_synthetic_dataset(
    out_dir: str | Path,
    num_images: int = 40,
    image_size: tuple[int, int] = (160, 128),
    max_objects: int = 4,
    size_range: tuple[float, float] = (0.15, 0.4),
    seed: int = 0,
    classes: tuple[str, ...] | None = None,
    style: str = "colour",
    max_distractors: int = 0,
) -> Path:
    """Write ``out_dir/images/*.png`` and ``out_dir/annotations.json``; return the JSON path.

    ``size_range`` is the object side as a fraction of the shorter image side. ``colour``
    style: class k is drawn as shape ``CLASSES[k % 3]`` in that shape's colour family (so
    more than three classes share shapes); ``texture`` style: the classes are
    ``TEXTURE_CLASSES`` (shape x plain / striped, any colour), with up to
    ``max_distractors`` unlabeled distractors per image drawn first.
    """
    if style not in STYLES:
        raise ValueError(f"unknown synthetic style {style!r} (choose from {', '.join(STYLES)})")
    classes = classes or (TEXTURE_CLASSES if style == "texture" else CLASSES)
    out_dir = Path(out_dir)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = image_size
    images, annotations = [], []
    short = min(width, height)
    for i in range(num_images):
        img = _background(rng, width, height)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(0, max_distractors + 1)) if max_distractors else 0):
            side = rng.uniform(*size_range, size=2) * short
            x, y = rng.uniform(0, width - side[0]), rng.uniform(0, height - side[1])
            colour = tuple(int(c) for c in rng.uniform(20, 235, size=3))
            _distractor(draw, rng, (x, y, x + side[0], y + side[1]), colour)
        n = int(rng.integers(1, max_objects + 1))
        for _ in range(n):
            cls = int(rng.integers(len(classes)))
            shape = CLASSES[cls % len(CLASSES)]
            w = rng.uniform(*size_range) * short * rng.uniform(0.8, 1.25)
            h = rng.uniform(*size_range) * short * rng.uniform(0.8, 1.25)
            w, h = min(w, width - 2), min(h, height - 2)
            x1 = rng.uniform(0, width - w)
            y1 = rng.uniform(0, height - h)
            box = (float(x1), float(y1), float(x1 + w), float(y1 + h))
            if style == "texture":
                _texture_object(img, rng, classes[cls], box)
            else:
                jitter = rng.integers(-35, 36, size=3)
                rgb = np.clip(np.array(_BASE_COLOURS[shape]) + jitter, 0, 255)
                _draw_shape(draw, shape, box, tuple(int(c) for c in rgb))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": cls + 1,
                    "bbox": [round(box[0], 2), round(box[1], 2), round(w, 2), round(h, 2)],
                    "area": round(w * h, 2),
                    "iscrowd": 0,
                }
            )
        name = f"synth_{i:05d}.png"
        img.save(img_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": c} for k, c in enumerate(classes)],
    }
    ann_path = out_dir / "annotations.json"
    ann_path.write_text(json.dumps(coco))
    return ann_path
