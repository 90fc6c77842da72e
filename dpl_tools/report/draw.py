"""Drawing pseudo labels on an image: teacher boxes dashed, polished boxes solid.

Shared by ``dpl show`` (one image) and the report's gallery thumbnails. A row is a dict
of the pseudo-label schema (``table.to_pylist()``); boxes are xyxy pixels of the original
image and are scaled to the drawn size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw, ImageFont

from dpl_tools.data.images import read_image
from dpl_tools.data.pseudo_views import BOX_COORDS
from dpl_tools.errors import DplError

TEACHER_COLOUR = (255, 150, 0)  # orange, dashed: the teacher's raw box
POLISHED_COLOUR = (0, 230, 255)  # cyan, solid: the polished box of a kept label
DROPPED_COLOUR = (170, 170, 170)  # grey, solid: polished box not kept for classification
CHANGED_COLOUR = (255, 40, 200)  # magenta label text: the polisher changed the class
TRUTH_COLOUR = (40, 200, 60)  # green, thin: a truth box (dpl report --ann)
FP_COLOUR = (230, 30, 30)  # red, solid: a kept pseudo label matching no truth of its class
MISSED_COLOUR = (255, 220, 0)  # yellow, thick: a truth box no kept pseudo label matches


def has_box(row: dict[str, Any], prefix: str) -> bool:
    """Whether the row holds a complete ``teacher`` / ``polished`` box."""
    return all(row.get(f"{prefix}_{c}") is not None for c in BOX_COORDS)


def _box(row: dict[str, Any], prefix: str, scale: float) -> tuple[float, ...]:
    return tuple(row[f"{prefix}_{c}"] * scale for c in BOX_COORDS)


def dashed_rectangle(draw: ImageDraw.ImageDraw, box: tuple, colour, width: int, dash: int):
    """Outline ``box`` (xyxy) with dashes of ``dash`` px."""
    x1, y1, x2, y2 = box
    for (ax, ay), (bx, by) in (
        ((x1, y1), (x2, y1)),
        ((x2, y1), (x2, y2)),
        ((x2, y2), (x1, y2)),
        ((x1, y2), (x1, y1)),
    ):
        length = max(abs(bx - ax), abs(by - ay))
        steps = max(int(length // dash), 1)
        for i in range(0, steps, 2):
            t0, t1 = i / steps, min((i + 1) / steps, 1.0)
            draw.line(
                [
                    (ax + (bx - ax) * t0, ay + (by - ay) * t0),
                    (ax + (bx - ax) * t1, ay + (by - ay) * t1),
                ],
                fill=colour,
                width=width,
            )


def draw_label(draw, size, xy: tuple[float, float], text: str, colour, font, above: bool) -> None:
    """Text on a black tag at ``xy`` (above or below it), kept inside the picture."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left + 4, bottom - top + 3
    x, y = xy[0], xy[1] - h if above else xy[1]
    x = min(max(x, 0), max(size[0] - w, 0))
    y = min(max(y, 0), max(size[1] - h, 0))
    draw.rectangle((x, y, x + w, y + h), fill=(0, 0, 0))
    draw.text((x + 2 - left, y + 1 - top), text, fill=colour, font=font)


def class_name(names: dict[int, str], label: int | None) -> str:
    """Display name of a COCO category id."""
    if label is None:
        return "?"
    return names.get(int(label), f"class {label}")


def draw_truth(draw, truth: Any, names: dict[int, str], scale: float, width: int, font,
               size: tuple[int, int]) -> None:  # fmt: skip
    """Truth boxes thin green; the missed ones thick yellow, labelled ``missed``."""
    for i, (box, label) in enumerate(zip(truth.boxes, truth.labels, strict=True)):
        scaled = tuple(float(v) * scale for v in box)
        if i in truth.missed:
            draw.rectangle(scaled, outline=MISSED_COLOUR, width=2 * width)
            text = f"missed {class_name(names, int(label))}"
            draw_label(draw, size, (scaled[0], scaled[3]), text, MISSED_COLOUR, font, False)
        else:
            draw.rectangle(scaled, outline=TRUTH_COLOUR, width=1)


def draw_pseudo_labels(
    image: Image.Image, rows: list[dict[str, Any]], names: dict[int, str], scale: float = 1.0,
    truth: Any = None,
) -> Image.Image:  # fmt: skip
    """Draw teacher boxes (dashed orange, class + score) and polished boxes (solid cyan, or
    grey when not kept for classification; class + polisher probability) on a copy. With
    ``truth`` (``report.truth_marks``): the truth boxes, missed ones in yellow, and kept
    labels that are false positives in red."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    side = max(out.size)
    width = max(1, round(side / 300))
    font = ImageFont.load_default(size=max(9, round(side / 48)))
    if truth is not None:
        draw_truth(draw, truth, names, scale, width, font, out.size)
    for row in rows:
        if has_box(row, "teacher"):
            box = _box(row, "teacher", scale)
            dashed_rectangle(draw, box, TEACHER_COLOUR, width, dash=max(3, 3 * width))
            text = f"{class_name(names, row['teacher_label'])} {row['teacher_score'] or 0:.2f}"
            draw_label(draw, out.size, (box[0], box[1]), text, TEACHER_COLOUR, font, above=True)
    for row in rows:
        if has_box(row, "polished"):
            box = _box(row, "polished", scale)
            colour = POLISHED_COLOUR if row.get("use_cls") else DROPPED_COLOUR
            if row.get("truth_mark") == "fp":
                colour = FP_COLOUR
            draw.rectangle(box, outline=colour, width=width)
            changed = row.get("polished_label") not in (None, row.get("teacher_label"))
            prob = row.get("polisher_prob")
            text = class_name(names, row.get("polished_label")) + (
                f" p{prob:.2f}" if prob is not None else ""
            )
            draw_label(
                draw,
                out.size,
                (box[0], box[3]),
                text,
                CHANGED_COLOUR if changed else colour,
                font,
                False,
            )
    return out


def render_image(
    path: str | Path, rows: list[dict[str, Any]], names: dict[int, str], size: int = 0,
    truth: Any = None,
) -> Image.Image:  # fmt: skip
    """Read ``path`` (``read_image``; raises ImageReadError), scale its long side to ``size``
    pixels (0: keep), and draw its pseudo labels."""
    image = read_image(path)
    if size > 0:
        ratio = size / max(image.size)
        new = (max(1, round(image.width * ratio)), max(1, round(image.height * ratio)))
        image = image.resize(
            new, Image.Resampling.LANCZOS if ratio < 1 else Image.Resampling.BICUBIC
        )
    width = rows[0].get("width") if rows else None
    scale = image.width / width if width else 1.0
    return draw_pseudo_labels(image, rows, names, scale, truth)


def rows_for_image(table: pa.Table, image: str | Path) -> list[dict[str, Any]]:
    """The rows of one image: ``image`` is its file name in the table, or a path ending with
    it, or (when unique) a path with the same base name. DplError when nothing matches."""
    posix = Path(image).as_posix()
    names = [n for n in pc.unique(table["file_name"]).to_pylist() if n is not None]
    found = [n for n in names if posix == n or posix.endswith("/" + n)]
    if not found:
        found = [n for n in names if Path(n).name == Path(image).name]
    if not found:
        raise DplError(f"{image}: no pseudo labels for this image in the labels file")
    if len(found) > 1:
        found.sort(key=len, reverse=True)
        if not (posix == found[0] or posix.endswith("/" + found[0])):
            raise DplError(f"{image}: ambiguous, the labels hold {', '.join(found[:3])}")
    return table.filter(pc.equal(table["file_name"], found[0])).to_pylist()
