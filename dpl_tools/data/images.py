"""Robust image decoding: EXIF orientation, any mode to RGB, clear errors for bad files."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from dpl_tools.errors import DplError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Very large photos (aerial, pathology) are legitimate here; keep a bound against
# decompression bombs but far above PIL's default of ~89 Mpx.
Image.MAX_IMAGE_PIXELS = 1_000_000_000


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
                elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
                    img = img.point(lambda v: v * (1 / 256)).convert("L")
                return img.convert("RGB")
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(path, f"image too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(path, f"corrupt or truncated image ({e})") from None


def list_images(root: str | Path) -> list[Path]:
    """All image files under ``root`` (recursive, common extensions), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DplError(f"{root}: not a directory")
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
