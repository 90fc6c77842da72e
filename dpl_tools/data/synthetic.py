"""A built-in synthetic detection dataset: coloured shapes on textured backgrounds.

Used by the tests (tiny sizes) and by ``dpl demo`` (no download needed). Each class is
a shape with its own colour family, so a small detector learns it in minutes on CPU,
while sizes, positions, overlaps, colour jitter and background texture make boxes and
classes imperfect enough for pseudo labels to need polishing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("square", "disc", "triangle")
_BASE_COLOURS = {"square": (200, 60, 50), "disc": (60, 170, 70), "triangle": (60, 80, 200)}


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


def make_synthetic_dataset(
    out_dir: str | Path,
    num_images: int = 40,
    image_size: tuple[int, int] = (160, 128),
    max_objects: int = 4,
    size_range: tuple[float, float] = (0.15, 0.4),
    seed: int = 0,
    classes: tuple[str, ...] = CLASSES,
) -> Path:
    """Write ``out_dir/images/*.png`` and ``out_dir/annotations.json``; return the JSON path.

    ``size_range`` is the object side as a fraction of the shorter image side; class k
    is drawn as shape ``CLASSES[k % 3]`` (so more than three classes share shapes).
    """
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
        n = int(rng.integers(1, max_objects + 1))
        for _ in range(n):
            cls = int(rng.integers(len(classes)))
            shape = CLASSES[cls % len(CLASSES)]
            w = rng.uniform(*size_range) * short * rng.uniform(0.8, 1.25)
            h = rng.uniform(*size_range) * short * rng.uniform(0.8, 1.25)
            w, h = min(w, width - 2), min(h, height - 2)
            x1 = rng.uniform(0, width - w)
            y1 = rng.uniform(0, height - h)
            jitter = rng.integers(-35, 36, size=3)
            rgb = np.clip(np.array(_BASE_COLOURS[shape]) + jitter, 0, 255)
            colour = tuple(int(c) for c in rgb)
            box = (float(x1), float(y1), float(x1 + w), float(y1 + h))
            _draw_shape(draw, shape, box, colour)
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
