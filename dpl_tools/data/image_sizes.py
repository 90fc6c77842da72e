"""An image's annotated width / height checked against its file (``load_coco`` with an image
folder): a missing file drops the image; a size that differs from the decoded
(EXIF-upright) image is repaired when the difference is explainable, else the image is
dropped, each case counted in the validation report (``dpl_tools.data.coco``'s docstring
lists the cases).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpl_tools.data.images import ImageGeometry, ImageReadError, image_geometry

if TYPE_CHECKING:
    from dpl_tools.data.coco import ValidationReport

BoxMap = Callable[[float, float, float, float], tuple[float, float, float, float]]
_SIZE_RESCALED = "width/height differ from the image file by a resize (boxes rescaled to it)"
_SIZE_EXIF = "annotated on the stored pixels of an EXIF-rotated image (boxes rotated upright)"
_SIZE_DROPPED = "width/height differ from the image file, not by a resize (image dropped)"


def _uniform(aw: float, ah: float, w: int, h: int) -> bool:
    """Whether ``w x h`` is ``aw x ah`` resized with one factor, up to pixel rounding."""
    return abs(w * ah - h * aw) <= max(aw, ah)


def _orient(box: tuple[float, float, float, float], geo: ImageGeometry):
    """A box in stored pixels mapped into the EXIF-upright image (as exif_transpose does)."""
    x1, y1, x2, y2 = box
    sw, sh = geo.stored_width, geo.stored_height
    point = {
        5: lambda x, y: (y, x),  # transpose
        6: lambda x, y: (sh - y, x),  # rotate 90 clockwise
        7: lambda x, y: (sh - y, sw - x),  # transverse
        8: lambda x, y: (y, sw - x),  # rotate 90 counter-clockwise
    }[geo.orientation]
    (ax, ay), (bx, by) = point(x1, y1), point(x2, y2)
    return min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)


def _frame_fix(im: dict[str, Any], geo: ImageGeometry) -> tuple[str, BoxMap | None] | None:
    """How an image's boxes reach its decoded frame: None when the sizes agree, else
    (problem, box map), the map None when the image must be dropped."""
    aw, ah = float(im["width"]), float(im["height"])
    width, height = geo.size
    if (aw, ah) == (width, height):
        return None
    if _uniform(aw, ah, width, height):
        sx, sy = width / aw, height / ah
        return _SIZE_RESCALED, lambda x, y, w, h: (x * sx, y * sy, w * sx, h * sy)
    if geo.swaps_sides and _uniform(aw, ah, geo.stored_width, geo.stored_height):
        sx, sy = geo.stored_width / aw, geo.stored_height / ah

        def rotate(x: float, y: float, w: float, h: float):
            x1, y1, x2, y2 = _orient((x * sx, y * sy, (x + w) * sx, (y + h) * sy), geo)
            return x1, y1, x2 - x1, y2 - y1

        return _SIZE_EXIF, rotate
    return _SIZE_DROPPED, None


def _geometries(paths: list[Path]) -> list[ImageGeometry | None]:
    """Header geometry per path (None when unreadable; decoding reports it later)."""

    def one(p: Path) -> ImageGeometry | None:
        try:
            return image_geometry(p)
        except ImageReadError:
            return None

    if len(paths) < 64:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, paths, chunksize=64))


def size_mismatches(root: Path, images: list[tuple[str, int, int]]) -> list[str]:
    """File names of ``(file_name, width, height)`` whose file under ``root`` now decodes
    to another (EXIF-upright) size; unreadable files are left to the decoder to report."""
    geometries = _geometries([root / name for name, _, _ in images])
    return [
        name
        for (name, width, height), geo in zip(images, geometries, strict=True)
        if geo is not None and geo.size != (width, height)
    ]


def fit_images_to_files(
    images: list[dict[str, Any]], images_dir: Path, report: ValidationReport
) -> tuple[list[dict[str, Any]], dict[int, BoxMap]]:
    """Drop images whose file is missing; check each width/height against the file (see
    ``dpl_tools.data.coco``'s docstring). Returns the kept images and box maps of repaired ones."""
    present = []
    for im in images:
        if (images_dir / im["file_name"]).is_file():
            present.append(im)
        else:
            report.add("missing image file (image dropped)", str(images_dir / im["file_name"]))
    kept, maps = [], {}
    geometries = _geometries([images_dir / im["file_name"] for im in present])
    for im, geo in zip(present, geometries, strict=True):
        fix = _frame_fix(im, geo) if geo is not None else None
        if fix is not None:
            problem, box_map = fix
            width, height = geo.size
            report.add(
                problem,
                f"image {im['id']} {im['file_name']}: annotated {im['width']}x{im['height']}, "
                f"file {width}x{height}",
            )
            if box_map is None:
                continue
            maps[im["id"]] = box_map
            im["width"], im["height"] = width, height
        kept.append(im)
    return kept, maps
