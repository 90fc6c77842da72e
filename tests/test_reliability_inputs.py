"""Hostile or odd inputs that used to cost a whole run, gigabytes or a traceback.

One test (or a few) per defect: D5 YAML alias bombs, D6 decompression-bomb images, D8
extreme aspect ratios, D9 non-UTF-8 text inputs, D14 control characters in category
names, D15 ids beyond int64, D18 a width given as a string, D21 duplicate file and
category names. Every file here is tiny on disk (the bomb image is a 110 KB PNG).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import typer
from PIL import Image
from test_polish import FAST, make_run

from dpl_tools.config import read_config
from dpl_tools.data.coco import validate_coco
from dpl_tools.data.convert import convert
from dpl_tools.data.detections import read_category_map, read_classes
from dpl_tools.data.image_list import load_image_list
from dpl_tools.data.images import ImageReadError, image_size, read_image
from dpl_tools.data.pseudo_label_writer import rows_to_table
from dpl_tools.data.pseudo_labels import META_CATEGORIES, read_pseudo_labels
from dpl_tools.data.voc import convert_voc
from dpl_tools.data.yolo_labels import convert_yolo
from dpl_tools.errors import DplError
from dpl_tools.textfiles import MAX_ALIAS_EXPANSION, parse_yaml

ROOT = Path(__file__).resolve().parents[1]
# 316 bytes that a reader walking the result (str(names)) expands to 9**9 nodes.
ALIAS_BOMB = (
    "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    + "names: *i\n"
)
LATIN1 = "caf\xe9\n".encode("latin-1")  # byte 0xe9 at offset 3: not UTF-8


def _limit_memory() -> None:
    """Subprocesses get 8 GB of address space: a regression fails, not the machine."""
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


def dpl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    single = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dpl_tools.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **single, **(env or {})},
        preexec_fn=_limit_memory,
    )


def _one_line_error(proc: subprocess.CompletedProcess, *parts: str) -> str:
    """Exit status 2 and one `error: ...` line holding every part, no traceback."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def _single_colour_png(path: Path, width: int, height: int) -> Path:
    """A valid all-black 1-bit PNG: rows of zeros compress about 1000:1."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    rows = b"\0" * (1 + (width + 7) // 8) * 100
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(rows) for _ in range(height // 100))
    idat += comp.compress(b"\0" * (1 + (width + 7) // 8) * (height % 100)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


@pytest.fixture(scope="module")
def bomb_png(module_dir) -> Path:
    """30000x30000 pixels (900 Mpx, 2.7 GB as RGB) in a 110 KB file."""
    return _single_colour_png(module_dir("bomb") / "bomb.png", 30000, 30000)


def _yolo_dataset(root: Path) -> Path:
    """images/ with two small images, labels/ with one box each."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (40, 30), (200, 50, 50)).save(root / "images" / f"{name}.png")
        (root / "labels" / f"{name}.txt").write_text("0 0.5 0.5 0.4 0.4\n")
    return root


def _voc_xml(name: str, filename: str = "") -> str:
    return (
        f"<annotation><filename>{filename}</filename><size><width>40</width>"
        "<height>30</height></size><object><name>" + name + "</name><bndbox><xmin>5</xmin>"
        "<ymin>5</ymin><xmax>20</xmax><ymax>20</ymax></bndbox></object></annotation>"
    )


def _voc_root(root: Path, names: dict[str, str]) -> Path:
    """VOC layout: one XML (class ``names[stem]``) and one image per stem."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    for stem, cls in names.items():
        Image.new("RGB", (40, 30)).save(root / "JPEGImages" / f"{stem}.png")
        (root / "Annotations" / f"{stem}.xml").write_text(_voc_xml(cls))
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(names) + "\n")
    return root


def _coco(images=None, categories=None, annotations=None) -> dict:
    return {
        "images": images or [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": annotations or [],
        "categories": categories or [{"id": 1, "name": "thing"}],
    }


# ------------------------------------------------------------------ D5 alias bombs


def test_alias_bomb_is_refused_quickly_and_ordinary_anchors_still_work():
    with pytest.raises(DplError, match=r"^data.yaml: YAML aliases expand it by [\d,]+ ") as e:
        parse_yaml(ALIAS_BOMB, "data.yaml")
    assert "alias bomb" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DplError, match="refers to a node containing it"):
        parse_yaml("a: &a [1, *a]", "x.yaml")
    shared = "base: &b {lr: 0.1}\nteacher: {<<: *b, iters: 5}\nstudent: *b\n"
    assert parse_yaml(shared, "x.yaml") == {
        "base": {"lr": 0.1},
        "teacher": {"lr": 0.1, "iters": 5},
        "student": {"lr": 0.1},
    }
    # Just under the limit is fine: a 1,000-character scalar repeated 900 times.
    near = "s: &s " + "x" * 1000 + "\nl: [" + ", ".join(["*s"] * 900) + "]\n"
    assert len(parse_yaml(near, "x.yaml")["l"]) == 900 < MAX_ALIAS_EXPANSION


def test_every_yaml_reader_refuses_an_alias_bomb(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    for read in (read_config, read_category_map, read_classes):
        with pytest.raises(DplError, match=f"^{bomb}: YAML aliases expand"):
            read(bomb)
    yolo = _yolo_dataset(tmp_path / "yolo")
    (yolo / "data.yaml").write_text(ALIAS_BOMB)
    with pytest.raises(DplError, match=f"^{yolo / 'data.yaml'}: YAML aliases expand"):
        convert_yolo(yolo, progress=False)


def test_convert_yolo_with_an_alias_bomb_data_yaml_is_one_line_error(tmp_path):
    yolo = _yolo_dataset(tmp_path / "yolo")
    (yolo / "data.yaml").write_text(ALIAS_BOMB)
    proc = dpl("convert", "--format", "yolo", str(yolo), "--out", str(tmp_path / "o.json"))
    _one_line_error(proc, str(yolo / "data.yaml"), "alias bomb")
    assert not (tmp_path / "o.json").exists()


def test_set_value_alias_bomb_is_a_usage_error():
    from dpl_tools.cli.options import set_overrides

    bomb = "[" + ", ".join(["&a [x, x, x, x, x, x, x, x, x, x]"] + ["*a"] * 9) + "]"
    assert set_overrides([f"model.detector_kwargs={{k: {bomb}}}"])  # small: allowed
    nested = ALIAS_BOMB.replace("\n", ", ").rstrip(", ")
    with pytest.raises(typer.BadParameter, match="alias bomb"):
        set_overrides([f"model.detector_kwargs={{{nested}}}"])


# ---------------------------------------------------- D6 / D8 image size and shape


def test_decompression_bomb_is_refused_before_decoding(bomb_png):
    assert bomb_png.stat().st_size < 200_000
    assert image_size(bomb_png) == (30000, 30000)  # the header is still readable
    code = (
        "import resource, sys\n"
        "from dpl_tools.data.images import ImageReadError, read_image\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        f"    read_image({str(bomb_png)!r})\n"
        "except ImageReadError as e:\n"
        "    print(e.reason)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limit_memory,
    )
    assert proc.returncode == 0, proc.stderr
    reason, grown_mb = proc.stdout.strip().splitlines()
    assert reason.startswith("image too large to decode (30000x30000 = 900,000,000 pixels")
    assert "DPL_MAX_IMAGE_PIXELS" in reason
    assert int(grown_mb) < 100  # decoding alone would need 900 MB, RGB 2.7 GB


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    path = tmp_path / "img.png"
    Image.new("RGB", (100, 80), (1, 2, 3)).save(path)
    monkeypatch.setenv("DPL_MAX_IMAGE_PIXELS", "7999")
    with pytest.raises(ImageReadError, match=r"100x80 = 8,000 pixels, over the limit of 7,999"):
        read_image(path)
    for value in ("8000", "none", "0", ""):
        monkeypatch.setenv("DPL_MAX_IMAGE_PIXELS", value)
        assert read_image(path).size == (100, 80)
    monkeypatch.setenv("DPL_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(DplError, match="^DPL_MAX_IMAGE_PIXELS='lots': expected a whole number"):
        read_image(path)


@pytest.mark.parametrize("size", [(60000, 2), (2, 60000), (1001, 10)])
def test_extreme_aspect_ratio_is_unreadable_with_its_reason(tmp_path, size):
    path = tmp_path / "strip.png"
    Image.new("L", size, 128).save(path)
    with pytest.raises(ImageReadError, match=r"extreme aspect ratio \(\d+x\d+, over 100:1\)"):
        read_image(path)
    Image.new("L", (1000, 10), 128).save(path)  # 100:1 is still read
    assert read_image(path).size == (1000, 10)


def test_polish_skips_a_bomb_and_a_strip_and_finishes(tmp_path, bomb_png):
    images, run = make_run(tmp_path / "run", num_images=2)
    folder = tmp_path / "unlabeled"
    shutil.copytree(images, folder)
    shutil.copy(bomb_png, folder / "bomb.png")
    Image.new("RGB", (60000, 2), (90, 90, 90)).save(folder / "strip.png")
    out = tmp_path / "labels.parquet"
    argv = ["polish", "--images", str(folder), "--out", str(out), "--run-dir", str(run), *FAST]
    proc = dpl(*argv)
    assert proc.returncode == 0, proc.stderr
    rows = {r["file_name"]: r for r in pq.read_table(out).to_pylist()}
    assert rows["bomb.png"]["status"] == "skipped"
    assert rows["bomb.png"]["error"].startswith("image too large to decode (30000x30000")
    assert rows["strip.png"]["status"] == "skipped"
    assert "extreme aspect ratio (60000x2" in rows["strip.png"]["error"]
    assert sum(r["status"] != "skipped" for r in rows.values()) == 2  # the others polished


def test_train_teacher_skips_a_strip_naming_it(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 48), (40, 120, 200)).save(images / "ok.png")
    Image.new("RGB", (60000, 2), (90, 90, 90)).save(images / "strip.png")
    raw = _coco(
        images=[
            {"id": 1, "file_name": "ok.png", "width": 64, "height": 48},
            {"id": 2, "file_name": "strip.png", "width": 60000, "height": 2},
        ],
        annotations=[
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20]},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [5, 0, 200, 2]},
        ],
    )
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(raw))
    proc = dpl(
        "train-teacher", "--ann", str(ann), "--images", str(images),
        "--out", str(tmp_path / "teacher.pt"), "--arch", "mobilenet_v2_fpn",
        "--backbone-weights", "none", "--iters", "2", "--batch-size", "1",
        "--min-size", "64", "--max-size", "96", "--workers", "0", "--device", "cpu",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    skipped = f"skipped unreadable image {images / 'strip.png'}: extreme aspect ratio"
    assert skipped in proc.stderr
    assert (tmp_path / "teacher.pt").is_file()


# --------------------------------------------------------------- D9 not UTF-8


def test_non_utf8_split_file_data_yaml_and_classes_txt_name_the_file(tmp_path):
    voc = _voc_root(tmp_path / "voc", {"img1": "cat"})
    split = voc / "ImageSets" / "Main" / "train.txt"
    split.write_bytes(LATIN1)
    with pytest.raises(DplError, match=f"^{split}: not UTF-8 text \\(byte 0xe9 at offset 3\\)"):
        convert_voc(voc, split="train", progress=False)

    yolo = _yolo_dataset(tmp_path / "yolo")
    (yolo / "classes.txt").write_bytes(LATIN1)
    with pytest.raises(DplError, match=f"^{yolo / 'classes.txt'}: not UTF-8 text"):
        convert_yolo(yolo, progress=False)
    (yolo / "data.yaml").write_bytes(b"names: [" + LATIN1.strip() + b"]\n")
    proc = dpl("convert", "--format", "yolo", str(yolo), "--out", str(tmp_path / "o.json"))
    _one_line_error(proc, f"{yolo / 'data.yaml'}: not UTF-8 text (byte 0xe9 at offset 11)")

    proc = dpl("convert", str(voc), "--split", "train", "--out", str(tmp_path / "o.json"))
    _one_line_error(proc, f"{split}: not UTF-8 text")


# ------------------------------------------------ D14 control characters in names


@pytest.mark.parametrize("name", ["a\nb", "tab\there", "nul\0", "sep\u2028x", "bell\x07"])
def test_category_names_with_control_characters_are_refused(name):
    raw = _coco(categories=[{"id": 1, "name": "ok"}, {"id": 2, "name": name}])
    with pytest.raises(DplError, match=r"^ann.json: 1 category name\(s\) with a control") as e:
        validate_coco(raw, "ann.json")
    assert "category 2: name " in str(e.value) and "\n" not in str(e.value)


def test_control_characters_in_voc_and_yolo_class_names(tmp_path):
    voc = _voc_root(tmp_path / "voc", {"img1": "cat", "img2": "line&#10;break"})
    result = convert_voc(voc, progress=False)
    assert result.coco.category_names == ["cat"]
    assert result.skipped_files == [
        (
            str(voc / "Annotations" / "img2.xml"),
            "object #0: class name 'line\\nbreak' contains a control character (U+000A)",
        )
    ]
    yolo = _yolo_dataset(tmp_path / "yolo")
    (yolo / "classes.txt").write_text("ok\nbad\x1cname\n")  # splitlines() would split here
    with pytest.raises(DplError, match=f"^{yolo / 'classes.txt'}: class 1 name 'bad\\\\x1cname'"):
        convert_yolo(yolo, progress=False)
    (yolo / "data.yaml").write_text('names: ["a", "b\\nc", "d"]\n')
    proc = dpl("convert", "--format", "yolo", str(yolo), "--out", str(tmp_path / "o.json"))
    _one_line_error(proc, f"{yolo / 'data.yaml'}: class 1 name 'b\\nc' contains a control")
    proc = dpl(
        "convert", "--format", "yolo", str(yolo), "--classes", "x,y\tz",
        "--out", str(tmp_path / "o.json"),
    )  # fmt: skip
    _one_line_error(proc, "category name(s) with a control character")


# ------------------------------------------------------------ D15 ids beyond int64


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r["images"][0].update(id=2**70), "image #0: id = 1180591620717411303424"),
        (lambda r: r["categories"][0].update(id=-(2**63) - 1), "category #0: id = -9223372036"),
        (lambda r: r["annotations"][0].update(id=2**63), "annotation #0: id = 9223372036"),
        (lambda r: r["annotations"][0].update(image_id=1e30), "annotation #0 (id 1): image_id"),
        (lambda r: r["annotations"][0].update(category_id=2**64), "category_id = 18446744"),
    ],
)
def test_ids_outside_int64_are_refused(mutate, message):
    raw = _coco(annotations=[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 9, 9]}])
    mutate(raw)
    with pytest.raises(DplError, match="outside the 64-bit integer range") as e:
        validate_coco(raw, "ann.json")
    assert str(e.value).startswith("ann.json: 1 ") and message in str(e.value)


def test_int64_edge_ids_are_accepted_and_polish_lists_refuse_larger(tmp_path):
    raw = _coco(
        images=[{"id": 2**63 - 1, "file_name": "a.png", "width": 40, "height": 30}],
        categories=[{"id": -(2**63), "name": "thing"}],
    )
    assert validate_coco(raw, "ann.json").images[0]["id"] == 2**63 - 1
    listed = tmp_path / "list.json"
    image = {"id": 2**70, "file_name": "a.png", "width": 40, "height": 30}
    listed.write_text(json.dumps(_coco(images=[image])))
    with pytest.raises(DplError, match=f"^{listed}: image #0 has id 1180591620717411303424, "):
        load_image_list(listed)
    proc = dpl("convert", str(listed), "-f", "coco", "--out", str(tmp_path / "o.json"))
    _one_line_error(proc, str(listed), "outside the 64-bit integer range")


# ------------------------------------------------------------- D18 string sizes


def test_width_given_as_a_string_is_named_as_one():
    raw = _coco(images=[{"id": 1, "file_name": "a.png", "width": "160", "height": 128}])
    with pytest.raises(DplError) as e:
        validate_coco(raw, "ann.json")
    assert str(e.value) == (
        "ann.json: 1 image(s) without a positive width/height (e.g. image 1 a.png: "
        'width "160" is a string, expected a number)'
    )
    raw["images"][0].update(width=160, height=None)
    with pytest.raises(DplError, match="height is null, expected a number"):
        validate_coco(raw, "ann.json")
    raw["images"][0].update(height=True)
    with pytest.raises(DplError, match="height true is a boolean, expected a number"):
        validate_coco(raw, "ann.json")
    raw["images"][0].update(height=-4)
    with pytest.raises(DplError, match=r"a.png: 160x-4\)$"):
        validate_coco(raw, "ann.json")


# ------------------------------------------------- D21 duplicate names everywhere


def test_duplicate_file_and_category_names_are_refused_by_validation():
    two = [
        {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
        {"id": 2, "file_name": "a.png", "width": 40, "height": 30},
    ]
    with pytest.raises(DplError) as e:
        validate_coco(_coco(images=two), "ann.json")
    assert str(e.value) == (
        "ann.json: 1 duplicate image file_name(s) (e.g. file_name 'a.png' appears 2 times)"
    )
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "cat"}]
    with pytest.raises(DplError, match=r"1 duplicate category name\(s\) \(e.g. name 'cat'"):
        validate_coco(_coco(categories=cats), "ann.json")


def test_duplicates_are_refused_by_convert_split_and_train_teacher(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 30)).save(images / name)
    raw = _coco(
        images=[
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "b.png", "width": 40, "height": 30},
        ],
        categories=[{"id": 1, "name": "cat"}, {"id": 2, "name": "cat"}],
        annotations=[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 9, 9]}],
    )
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(raw))
    out = tmp_path / "out"
    for argv in (
        ["convert", str(ann), "-f", "coco", "--images", str(images), "--out", str(out)],
        ["split", str(ann), "--images", str(images), "--out-dir", str(out)],
        ["train-teacher", "--ann", str(ann), "--images", str(images), "--out", str(out),
         "--arch", "mobilenet_v2_fpn", "--backbone-weights", "none", "--iters", "1",
         "--workers", "0"],
    ):  # fmt: skip
        proc = dpl(*argv)
        _one_line_error(proc, f"{ann}: 1 duplicate category name(s)")
        assert not out.exists()


def test_voc_xml_repeating_an_image_is_skipped_not_fatal(tmp_path):
    voc = _voc_root(tmp_path / "voc", {"img1": "cat"})
    (voc / "Annotations" / "copy.xml").write_text(_voc_xml("cat", "img1.png"))
    (voc / "Annotations" / "img1.xml").write_text(_voc_xml("cat", "img1.png"))
    result = convert("voc", voc, progress=False)
    assert [im["file_name"] for im in result.coco.images] == ["img1.png"]
    assert result.skipped_files == [
        (str(voc / "Annotations" / "img1.xml"), "its image img1.png is already annotated by "
         "copy.xml")
    ]  # fmt: skip


# ------------------------------------- one image under two ids in a pseudo-label file

BOX = ("x1", "y1", "x2", "y2")


def _pseudo_row(image_id: int, name: str, box: tuple) -> dict:
    return {
        "image_id": image_id, "file_name": name, "width": 40, "height": 30, "status": "ok",
        **{f"teacher_{c}": v for c, v in zip(BOX, box, strict=True)},
        **{f"polished_{c}": v for c, v in zip(BOX, box, strict=True)},
        "teacher_label": 1, "polished_label": 1, "teacher_score": 0.9, "polisher_prob": 0.95,
        "use_cls": True, "use_reg": True,
    }  # fmt: skip


def _pseudo_file(path: Path, rows: list[dict]) -> Path:
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    meta = {META_CATEGORIES: [{"id": 1, "name": "thing"}]}
    pq.write_table(rows_to_table(cols, meta), path)
    return path


def test_pseudo_labels_with_one_file_name_under_two_image_ids_are_refused(tmp_path):
    """a.png's boxes under ids 1 and 3: export-only wrote annotations of image 3, which no
    image has (invalid COCO); export dropped them silently and show merged them."""
    rows = [
        _pseudo_row(1, "a.png", (1, 1, 10, 10)),
        _pseudo_row(2, "b.png", (2, 2, 12, 12)),
        _pseudo_row(3, "a.png", (5, 5, 20, 20)),
    ]
    labels = _pseudo_file(tmp_path / "p.parquet", rows)
    expect = f"{labels}: file_name 'a.png' appears under 2 image_ids (1 and 3); "
    with pytest.raises(DplError) as e:
        read_pseudo_labels(labels)
    assert str(e.value).startswith(expect) and "\n" not in str(e.value)
    coco_out = tmp_path / "x.json"
    proc = dpl("polish", "--export-only", "--out", str(labels), "--coco-out", str(coco_out))
    _one_line_error(proc, expect)
    assert not coco_out.exists()
    rows.append(_pseudo_row(4, "a.png", (6, 6, 20, 20)))  # three ids: two named, the rest counted
    with pytest.raises(DplError, match=r"'a.png' appears under 3 image_ids \(1, 3 and 1 more\)"):
        read_pseudo_labels(_pseudo_file(tmp_path / "p3.parquet", rows))
    # the same ids on the same file names are fine
    table, _ = read_pseudo_labels(_pseudo_file(tmp_path / "ok.parquet", rows[:2]))
    assert table.num_rows == 2


# ------------------------------------------------------------ COCO iscrowd values


def test_coco_iscrowd_string_is_one_line_error_in_convert_and_evaluate(tmp_path):
    """An iscrowd of "yes" passed convert and crashed evaluate --pseudo with an internal
    error; "0" was a crowd box to dpl but not to pycocotools. Both: one line, exit 2."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 30), (200, 50, 50)).save(images / name)
    labels = _pseudo_file(
        tmp_path / "p.parquet",
        [_pseudo_row(1, "a.png", (1, 1, 11, 11)), _pseudo_row(2, "b.png", (2, 2, 12, 12))],
    )
    out = tmp_path / "out.json"
    for value, argv in (
        ("yes", ["convert", "-f", "coco", "--images", str(images), "--out", str(out)]),
        ("0", ["evaluate", "--pseudo", str(labels), "--json", str(out), "--ann"]),
    ):
        raw = _coco(
            images=[
                {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                {"id": 2, "file_name": "b.png", "width": 40, "height": 30},
            ],
            annotations=[
                {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10]},
                {"id": 7, "image_id": 2, "category_id": 1, "bbox": [2, 2, 9, 9], "iscrowd": value},
            ],
        )
        ann = tmp_path / f"ann-{value}.json"
        ann.write_text(json.dumps(raw))
        proc = dpl(*argv, str(ann))
        _one_line_error(
            proc, f'{ann}: 1 annotation(s) with an invalid iscrowd (e.g. annotation 7: iscrowd = "'
            f'{value}")',
        )  # fmt: skip
        assert not out.exists()
