"""Robust image decoding: EXIF orientation, any mode to RGB, clear errors for bad files."""

from __future__ import annotations

import errno
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dpl_tools.errors import DplError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Decompression bombs: a small file (a 1 MB single-colour PNG) can declare 30000x30000
# pixels, which decoding and the detector's float copies turn into 10+ GB. read_image
# checks the header's pixel count before decoding and skips a larger image as unreadable.
# The limit is DPL_MAX_IMAGE_PIXELS (a whole number; 0 or "none": no limit), by default
# 100 megapixels (e.g. 10000x10000; a 12000x12000 image peaks at 6.5 GB in `polish`).
# Headers alone are always read (image_geometry), so PIL's own guard is off.
MAX_IMAGE_PIXELS_ENV = "DPL_MAX_IMAGE_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
# Detectors resize the shorter side up and cap the longer one (model.max_size), so a
# 60000x2 strip resizes to 0 pixels high and stops a whole run; longer/shorter side above
# this ratio is skipped as unreadable.
MAX_ASPECT_RATIO = 100
Image.MAX_IMAGE_PIXELS = None
_EXIF_ORIENTATION = 0x0112


class ImageReadError(DplError):
    """An image that cannot be decoded; long runs skip it and report path and reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def max_image_pixels() -> int | None:
    """The decoded-size limit of ``read_image`` in pixels (None: no limit), from
    ``DPL_MAX_IMAGE_PIXELS`` (default ``DEFAULT_MAX_IMAGE_PIXELS``)."""
    text = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_IMAGE_PIXELS
    if text.lower() in ("0", "none"):
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise DplError(
            f"{MAX_IMAGE_PIXELS_ENV}={text!r}: expected a whole number of pixels "
            "(e.g. 200000000), or 0 / none for no limit"
        )
    return value


def size_problem(width: int, height: int, limit: int | None) -> str | None:
    """Why an image of ``width`` x ``height`` pixels is not decoded, or None: more pixels
    than ``limit`` (None: no limit; see ``max_image_pixels``), or an extreme aspect ratio."""
    if limit is not None and width * height > limit:
        return (
            f"image too large to decode ({width}x{height} = {width * height:,} pixels, over "
            f"the limit of {limit:,}; raise it with {MAX_IMAGE_PIXELS_ENV})"
        )
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return (
            f"extreme aspect ratio ({width}x{height}, over {MAX_ASPECT_RATIO}:1): a detector "
            "cannot resize it"
        )
    return None


def read_image(path: str | Path) -> Image.Image:
    """Decode ``path`` to an upright RGB PIL image, or raise ImageReadError.

    The format is detected from content, not the extension (a PNG named .jpg works);
    EXIF orientation is applied; grayscale, palette, RGBA and 16-bit become RGB. The
    header is checked first (``size_problem``): too many pixels (``DPL_MAX_IMAGE_PIXELS``)
    or an extreme aspect ratio is an ImageReadError, before any pixel is decoded.
    """
    path = Path(path)
    limit = max_image_pixels()  # a bad DPL_MAX_IMAGE_PIXELS is a DplError, not a skip
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(path, "empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                problem = size_problem(*img.size, limit)
                if problem is not None:
                    raise ImageReadError(path, problem)
                img.load()
                img = ImageOps.exif_transpose(img)
                if img.mode in ("RGBA", "LA", "P", "PA"):
                    img = img.convert("RGBA")
                    background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                    img = Image.alpha_composite(background, img)
                elif img.mode.startswith("I") or img.mode == "F":
                    img = _to_8bit(img)
                return img.convert("RGB")
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(path, _missing_reason(path)) from None
    except IsADirectoryError:
        raise ImageReadError(path, "is a directory, not an image") from None
    except PermissionError:
        raise ImageReadError(path, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(path, f"image too large ({e})") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageReadError(path, "symbolic link loop") from None
        raise ImageReadError(path, f"corrupt or truncated image ({e})") from None
    except (SyntaxError, ValueError) as e:
        raise ImageReadError(path, f"corrupt or truncated image ({e})") from None
    except Exception as e:  # any other decoder failure must not stop a long run
        raise ImageReadError(path, f"cannot decode ({type(e).__name__}: {e})") from None


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer or float grayscale to 8-bit L, scaled by its range."""
    arr = np.asarray(img, dtype=np.float64)
    top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
    if img.mode == "F" and arr.max() <= 1.0:
        top = 1.0
    return Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), mode="L")


def _header_orientation(img: Image.Image) -> int:
    """EXIF orientation without decoding pixels (PNG: only an eXIf chunk before the data)."""
    if img.format == "PNG":
        exif = Image.Exif()
        if "exif" in img.info:
            exif.load(img.info["exif"])
        return exif.get(_EXIF_ORIENTATION, 1)
    return img.getexif().get(_EXIF_ORIENTATION, 1)


@dataclass(frozen=True)
class ImageGeometry:
    """An image file's stored pixel size and EXIF orientation (1 = upright, 5..8 swap sides)."""

    stored_width: int
    stored_height: int
    orientation: int = 1

    @property
    def swaps_sides(self) -> bool:
        return self.orientation in (5, 6, 7, 8)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the upright image, as ``read_image`` decodes it."""
        if self.swaps_sides:
            return self.stored_height, self.stored_width
        return self.stored_width, self.stored_height


def image_geometry(path: str | Path) -> ImageGeometry:
    """Stored size and EXIF orientation from the header (no pixels decoded).

    Raises ImageReadError when the header cannot be read.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                width, height = img.size
                orientation = _header_orientation(img)
    except FileNotFoundError:
        raise ImageReadError(path, _missing_reason(path)) from None
    except IsADirectoryError:
        raise ImageReadError(path, "is a directory, not an image") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not a recognised image format") from None
    except Exception as e:
        raise ImageReadError(path, f"cannot read image header ({type(e).__name__}: {e})") from None
    if not isinstance(orientation, int) or not 1 <= orientation <= 8:
        orientation = 1  # exif_transpose ignores such values too
    return ImageGeometry(width, height, orientation)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the upright image, read from the header (EXIF rotation applied).

    Raises ImageReadError when the header cannot be read.
    """
    return image_geometry(path).size


def _missing_reason(path: Path) -> str:
    """Why an open() found no file: a missing file, a dangling link or a link loop."""
    return (_link_problem(path) if path.is_symlink() else None) or "file not found"


def display_path(path: str | Path) -> str:
    """A path printable on any console: bytes that are not UTF-8 shown as ``\\xNN``."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def utf8_name(path: str | Path) -> bool:
    """Whether a path is valid UTF-8 (it can be stored in JSON and Parquet outputs)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class ImageScan:
    """A listed image folder: the image files, and entries passed over with the reason."""

    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _link_problem(path: Path) -> str | None:
    """The reason a symbolic link cannot be followed, or None when it resolves."""
    try:
        path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop"
        return "broken symbolic link (its target does not exist)"
    return None


def scan_images(root: str | Path) -> ImageScan:
    """Image files under ``root`` (recursive, common extensions, sorted) and what was passed
    over: folders named like images, dangling or looping links, folders reached twice
    (a symlink loop). Symlinked folders are followed once. Hidden entries (``.DS_Store``,
    macOS ``._x.jpg`` forks) are ignored silently."""
    root = Path(root)
    if not root.is_dir():
        raise DplError(f"{root}: not a directory")
    scan = ImageScan()
    seen: set[tuple[int, int]] = set()
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in seen:
                scan.skipped.append((folder, "symlink loop: folder already listed (not followed)"))
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            scan.skipped.append((folder, f"cannot list folder ({e.strerror or e})"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            image_named = path.suffix.lower() in IMAGE_EXTENSIONS
            problem = _link_problem(path) if entry.is_symlink() else None
            if problem is not None:
                scan.skipped.append((path, problem))
            elif entry.is_dir():
                if image_named:
                    scan.skipped.append((path, "a folder named like an image (its files listed)"))
                pending.append(path)
            elif image_named and entry.is_file():
                scan.files.append(path)
            elif image_named:
                scan.skipped.append((path, "not a regular file"))
    scan.files.sort()
    scan.skipped.sort()
    return scan


def list_images(root: str | Path) -> list[Path]:
    """All image files under ``root`` (recursive, common extensions), sorted.

    Hidden files and folders (``.DS_Store``, macOS ``._x.jpg`` forks) are skipped; see
    ``scan_images`` for the entries passed over with a reason.
    """
    return scan_images(root).files


def outside_root(file_name: str) -> bool:
    """Whether ``root / file_name`` would leave ``root``: an absolute path or one whose
    ``..`` parts climb above it (symbolic links inside the root are the user's choice)."""
    if os.path.isabs(file_name):
        return True
    norm = os.path.normpath(file_name)
    return norm == ".." or norm.startswith("../")
