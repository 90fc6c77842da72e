"""Robust image decoding: EXIF orientation, any mode to RGB, clear errors for bad files."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dpl_tools.errors import DplError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Very large photos (aerial, pathology) are legitimate here; keep a bound against
# decompression bombs but far above PIL's default of ~89 Mpx.
Image.MAX_IMAGE_PIXELS = 1_000_000_000
_EXIF_ORIENTATION = 0x0112


class ImageReadError(DplError):
    """An image that cannot be decoded; long runs skip it and report path and reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def read_image(path: str | Path) -> Image.Image:
    """Decode ``path`` to an upright RGB PIL image, or raise ImageReadError.

    The format is detected from content, not the extension (a PNG named .jpg works);
    EXIF orientation is applied; grayscale, palette, RGBA and 16-bit become RGB.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(path, "empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
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
        raise ImageReadError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageReadError(path, "is a directory, not an image") from None
    except PermissionError:
        raise ImageReadError(path, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(path, f"image too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
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


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the upright image, read from the header (EXIF rotation applied).

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
        raise ImageReadError(path, "file not found") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not a recognised image format") from None
    except Exception as e:
        raise ImageReadError(path, f"cannot read image header ({type(e).__name__}: {e})") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def list_images(root: str | Path) -> list[Path]:
    """All image files under ``root`` (recursive, common extensions), sorted.

    Hidden files and folders (``.DS_Store``, macOS ``._x.jpg`` forks) are skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise DplError(f"{root}: not a directory")
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.is_file()
    )
