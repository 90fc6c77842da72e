"""Robust image reading on real files written here: modes, EXIF, wrong extensions, damage."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dpl_tools.data.images import ImageReadError, image_size, list_images, read_image


def _two_colour(width: int = 40, height: int = 20) -> Image.Image:
    """Left half red, right half blue."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2, 0] = 255
    arr[:, width // 2 :, 2] = 255
    return Image.fromarray(arr)


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header claims width x height but holds no pixel data (cheap 'huge')."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_rgba_palette_gray_16bit_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 6), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "rgba.png")
    _two_colour().convert("P").save(tmp_path / "palette.png")
    Image.new("L", (8, 6), 77).save(tmp_path / "gray.jpg")
    Image.fromarray(np.full((6, 8), 65535, np.uint16)).save(tmp_path / "deep.png")

    img = read_image(tmp_path / "rgba.png")
    assert img.mode == "RGB" and img.size == (8, 6)
    assert img.getpixel((0, 0)) == (0, 0, 255) and img.getpixel((3, 3)) == (255, 255, 255)
    pal = read_image(tmp_path / "palette.png")
    assert pal.mode == "RGB" and pal.getpixel((0, 0)) == (255, 0, 0)
    assert pal.getpixel((39, 0)) == (0, 0, 255)
    gray = read_image(tmp_path / "gray.jpg")
    assert gray.mode == "RGB" and abs(gray.getpixel((2, 2))[0] - 77) <= 2
    deep = read_image(tmp_path / "deep.png")
    assert deep.mode == "RGB" and deep.getpixel((1, 1)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored image rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    _two_colour(40, 20).save(path, exif=exif, quality=95)
    img = read_image(path)
    assert img.size == (20, 40) and image_size(path) == (20, 40)
    top, bottom = np.asarray(img)[2, 10], np.asarray(img)[37, 10]
    assert top[0] > 200 and top[2] < 60  # the stored left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_png_saved_as_jpg_is_read_by_content(tmp_path):
    path = tmp_path / "actually_png.jpg"
    _two_colour().save(path, format="PNG")
    img = read_image(path)
    assert img.size == (40, 20) and img.getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.write_bytes(p.with_name("good.jpg").read_bytes()[:300]), "truncated"),
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("hello, not an image"), "not a recognised image format"),
        (lambda p: None, "file not found"),
        (lambda p: p.mkdir(), "is a directory"),
    ],
)
def test_bad_files_raise_image_read_error_with_file_and_reason(tmp_path, make, reason):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        tmp_path / "good.jpg"
    )
    path = tmp_path / "bad.jpg"
    make(path)
    with pytest.raises(ImageReadError) as e:
        read_image(path)
    assert e.value.path == path and reason in e.value.reason
    assert str(e.value).startswith(f"{path}: ")


def test_very_large_images_pass_the_decompression_bomb_guard(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    _png_header_only(path, 20000, 10000)  # 200 Mpx: beyond PIL's default hard limit
    assert image_size(path) == (20000, 10000)
    monkeypatch.setenv("DPL_MAX_IMAGE_PIXELS", "300000000")  # raised for such photos
    with pytest.raises(ImageReadError, match="corrupt or truncated"):  # no pixel data
        read_image(path)


def test_list_images_recurses_sorted_and_skips_hidden(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".cache").mkdir()
    for name in ("b.JPG", "a.png", "sub/c.jpeg", "._a.jpg", ".cache/d.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == [
        "a.png",
        "b.JPG",
        "sub/c.jpeg",
    ]
