"""VOC / YOLO / COCO conversion with exact counts and coordinates, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from dpl_tools.cli.cli import app
from dpl_tools.data.convert import convert_coco
from dpl_tools.data.voc import convert_voc, voc_box_to_coco
from dpl_tools.data.yolo_labels import convert_yolo
from dpl_tools.errors import DplError


def _xml(filename: str, objects: list[tuple], size: tuple[int, int] | None = (64, 48)) -> str:
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height></size>" if size else ""
    objs = "".join(
        f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>"
        f"<xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for name, x1, y1, x2, y2, difficult in objects
    )
    return f"<annotation><filename>{filename}</filename>{size_xml}{objs}</annotation>"


@pytest.fixture
def voc_root(tmp_path) -> Path:
    """Three images: a normal one, one with a degenerate + clipped + difficult box, and one
    whose XML lacks <size> (80x60 image); ImageSets/Main/train.txt lists two of them."""
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for stem, size in (("img1", (64, 48)), ("img2", (64, 48)), ("img3", (80, 60))):
        Image.new("RGB", size, (90, 90, 90)).save(root / "JPEGImages" / f"{stem}.jpg")
    xml = {
        "img1": _xml("img1.jpg", [("dog", 11, 21, 30, 40, 0), ("cat", 1, 1, 64, 48, 0)]),
        "img2": _xml(
            "img2.jpg",
            [("dog", 5, 5, 5, 5, 0), ("cat", 51, 10, 70, 20, 0), ("dog", 2, 3, 4, 5, 1)],
        ),
        "img3": _xml("wrong_name.jpg", [("bird", 1, 1, 10, 10, 0)], size=None),
    }
    for stem, text in xml.items():
        (root / "Annotations" / f"{stem}.xml").write_text(text)
    (root / "ImageSets" / "Main" / "train.txt").write_text("img2\nimg1\n")
    return root


def test_voc_box_convention():
    assert voc_box_to_coco(11, 21, 30, 40) == [10, 20, 20, 20]
    assert voc_box_to_coco(1, 1, 64, 48) == [0, 0, 64, 48]
    assert voc_box_to_coco(5, 5, 5, 5) == [4, 4, 0, 0]  # empty drag: zero size


def test_voc_root_exact_boxes_and_counts(voc_root):
    result = convert_voc(voc_root, progress=False)
    coco = result.coco
    assert result.images_dir == voc_root / "JPEGImages"
    assert coco.category_names == ["bird", "cat", "dog"]  # sorted names found
    assert [(im["file_name"], im["width"], im["height"]) for im in coco.images] == [
        ("img1.jpg", 64, 48),
        ("img2.jpg", 64, 48),
        ("img3.jpg", 80, 60),  # <filename> wrong -> found by stem; size from the header
    ]
    boxes = [(a["image_id"], a["category_id"], a["bbox"]) for a in coco.annotations]
    assert boxes == [
        (1, 3, [10.0, 20.0, 20.0, 20.0]),
        (1, 2, [0.0, 0.0, 64.0, 48.0]),
        (2, 2, [50.0, 9.0, 14.0, 11.0]),  # 50..70 clipped to the 64 px width
        (2, 3, [1.0, 2.0, 3.0, 3.0]),
        (3, 1, [0.0, 0.0, 10.0, 10.0]),
    ]
    assert coco.annotations[3]["difficult"] == 1 and coco.annotations[3]["iscrowd"] == 0
    assert "difficult" not in coco.annotations[0]
    assert coco.report.counts == {
        "zero or negative size box (dropped)": 1,
        "box outside its image (clipped)": 1,
    }


def test_voc_split_classes_and_skip_difficult(voc_root):
    coco = convert_voc(
        voc_root, split="train", classes=["dog", "cat"], skip_difficult=True, progress=False
    ).coco
    assert [im["file_name"] for im in coco.images] == ["img2.jpg", "img1.jpg"]  # split order
    assert coco.category_names == ["dog", "cat"]
    assert [a["category_id"] for a in coco.annotations] == [2, 1, 2]
    assert coco.report.counts["difficult object (dropped)"] == 1
    with pytest.raises(DplError, match=r"split 'val' not found \(available: train\)"):
        convert_voc(voc_root, split="val", progress=False)
    coco = convert_voc(voc_root, classes=["dog"], progress=False).coco
    assert coco.report.counts["class not in --classes (box dropped)"] == 3


def test_voc_plain_xml_folder_and_bad_xml(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "images" / "r1.jpg")  # the XML's <size>
    (tmp_path / "annotations" / "r1.xml").write_text(_xml("r1.jpg", [("raccoon", 2, 2, 9, 9, 0)]))
    (tmp_path / "annotations" / "r2.xml").write_text(_xml("r2.jpg", [("raccoon", 2, 2, 9, 9, 0)]))
    for src in (tmp_path, tmp_path / "annotations"):  # dataset root, or the XML folder itself
        result = convert_voc(src, progress=False)
        assert result.images_dir == tmp_path / "images"
        assert [im["file_name"] for im in result.coco.images] == ["r1.jpg"]
        assert result.coco.annotations[0]["bbox"] == [1.0, 1.0, 8.0, 8.0]
        assert result.coco.report.counts["missing image file (image dropped)"] == 1
    (tmp_path / "annotations" / "r3.xml").write_text("<annotation><object>")
    with pytest.raises(DplError, match=r"r3.xml: not valid XML"):
        convert_voc(tmp_path, progress=False, strict=True)
    (tmp_path / "annotations" / "r3.xml").write_text(_xml("r3.jpg", [("a", 1, "x", 3, 4, 0)]))
    with pytest.raises(DplError, match=r"r3.xml: object #0 \(a\) has non-numeric box"):
        convert_voc(tmp_path, progress=False, strict=True)


@pytest.fixture
def yolo_root(tmp_path) -> Path:
    root = tmp_path / "yolo"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
    Image.new("RGB", (80, 60)).save(root / "images" / "train" / "a.jpg")
    Image.new("RGB", (100, 50)).save(root / "images" / "train" / "b.png")
    (root / "images" / "train" / "broken.jpg").write_text("not an image")
    Image.new("RGB", (10, 10)).save(root / "images" / "val" / "v.jpg")
    (root / "labels" / "train" / "a.txt").write_text(
        "0 0.5 0.5 0.25 0.5\n"
        "1 0.9 0.5 0.4 0.2\n"  # reaches past the right edge: clipped
        "5 0.5 0.5 0.1 0.1\n"  # class 5 of 2: unknown category
        "\n"
        "1 0.1 0.1 0.3 0.1 0.2 0.4\n"  # polygon (segmentation row)
    )
    (root / "labels" / "train" / "orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (root / "data.yaml").write_text("path: .\nnames:\n  0: person\n  1: car\n")
    return root


def test_yolo_split_exact_boxes_and_counts(yolo_root):
    result = convert_yolo(yolo_root, split="train", progress=False)
    coco = result.coco
    assert result.images_dir == yolo_root / "images" / "train"
    assert coco.category_names == ["person", "car"]
    assert [(im["file_name"], im["width"], im["height"]) for im in coco.images] == [
        ("a.jpg", 80, 60),
        ("b.png", 100, 50),
    ]
    boxes = [(a["category_id"], [round(v, 6) for v in a["bbox"]]) for a in coco.annotations]
    assert boxes == [
        (1, [30.0, 15.0, 20.0, 30.0]),
        (2, [56.0, 24.0, 24.0, 12.0]),  # 56..88 clipped to 80
        (2, [8.0, 6.0, 16.0, 18.0]),  # polygon x 0.1..0.3, y 0.1..0.4
    ]
    counts = coco.report.counts
    assert counts["unknown category id (annotation dropped)"] == 1
    assert counts["box outside its image (clipped)"] == 1
    assert counts["polygon row (converted to its bounding box)"] == 1
    assert counts["unreadable image (image dropped)"] == 1
    assert counts["label file without an image (ignored)"] == 1
    assert len(counts) == 5


def test_yolo_without_split_txt_beside_images_and_bad_row(yolo_root, tmp_path):
    coco = convert_yolo(yolo_root, classes=["p", "c"], progress=False).coco
    assert [im["file_name"] for im in coco.images] == ["train/a.jpg", "train/b.png", "val/v.jpg"]
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (40, 20)).save(flat / "x.jpg")
    (flat / "x.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (flat / "classes.txt").write_text("thing\n")
    coco = convert_yolo(flat, progress=False).coco
    assert coco.category_names == ["thing"] and coco.annotations[0]["bbox"] == [10, 5, 20, 10]
    (flat / "x.txt").write_text("0 0.5 0.5 0.5 0.5\n0 0.5 zero 0.5 0.5\n")
    with pytest.raises(DplError, match=r"x.txt:2: non-numeric"):
        convert_yolo(flat, progress=False, strict=True)
    (flat / "classes.txt").unlink()
    with pytest.raises(DplError, match="no class names found"):
        convert_yolo(flat, progress=False)


def test_coco_pass_through_checks_image_files(synth_dataset):
    images = synth_dataset.parent / "images"
    full = convert_coco(synth_dataset, images).coco
    assert full.report.clean and len(full.images) == 24
    raw = json.loads(synth_dataset.read_text())
    raw["images"][0]["file_name"] = "gone.png"
    bad = synth_dataset.parent / "bad_for_convert_test.json"
    bad.write_text(json.dumps(raw))
    try:
        coco = convert_coco(bad, images).coco
    finally:
        bad.unlink()
    assert len(coco.images) == 23
    assert coco.report.counts["missing image file (image dropped)"] == 1


def test_cli_convert_voc_and_yolo(voc_root, yolo_root, tmp_path):
    runner = CliRunner()
    out = tmp_path / "voc.json"
    result = runner.invoke(app, ["convert", "--format", "voc", str(voc_root), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "zero or negative size box" in result.output and "3 images, 5 boxes" in result.output
    assert str(voc_root / "JPEGImages") in result.output.replace("\n", "")
    assert len(json.loads(out.read_text())["annotations"]) == 5
    out = tmp_path / "yolo.json"
    args = ["convert", "-f", "yolo", str(yolo_root), "--split", "train", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 images, 3 boxes, 2 classes" in result.output
    result = runner.invoke(app, ["convert", "-f", "coco", str(out), "-o", str(tmp_path / "c.json")])
    assert result.exit_code == 0 and "no problems found" in result.output


def test_cli_error_is_one_line_through_real_entry_point(voc_root, tmp_path):
    (voc_root / "Annotations" / "img1.xml").write_text("<annotation>")
    argv = ["convert", str(voc_root), "--out", str(tmp_path / "o"), "--strict"]  # else skipped
    proc = subprocess.run(
        [sys.executable, "-m", "dpl_tools.cli", *argv],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "img1.xml: not valid XML" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def test_yolo_only_label_file_bad_writes_nothing_and_says_why(tmp_path):
    """Three images, one label file whose only line has 4 values: its image is skipped, the
    two background images are left with no box. That run wrote a 0-box COCO JSON under
    "validation: no problems found" (the skipped file's box was not counted as input)."""
    root = tmp_path / "yolo"
    root.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (40, 30), (9, 9, 9)).save(root / f"{name}.png")
    (root / "a.txt").write_text("0 0.5 0.5 0.4\n")
    (root / "classes.txt").write_text("thing\n")
    out = tmp_path / "out.json"
    result = CliRunner().invoke(app, ["convert", "-f", "yolo", str(root), "--out", str(out)])
    assert isinstance(result.exception, DplError), result.output
    message = str(result.exception)
    assert message.startswith(f"{root}: all 1 boxes of the input were dropped, nothing written")
    assert "1 file(s) skipped" in message and "\n" not in message
    assert "needs 5 values, got 4 in '0 0.5 0.5 0.4'" in message
    assert not out.exists()
    assert "no problems found" not in result.output
    with pytest.raises(DplError, match=r"a.txt:1: expected 'class cx cy w h': a box row needs 5"):
        convert_yolo(root, progress=False, strict=True)
    # with a good label file beside it the set is written, still not as "no problems found"
    (root / "b.txt").write_text("0 0.5 0.5 0.4 0.4\n")
    result = CliRunner().invoke(app, ["convert", "-f", "yolo", str(root), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "no problems found" not in result.output
    assert "validation of" in result.output and "unusable file" in result.output
    assert len(json.loads(out.read_text())["annotations"]) == 1


def test_voc_only_xml_with_objects_bad_writes_nothing(tmp_path):
    """The XML with the set's only objects is malformed (skipped), the others have none:
    the objects of the skipped file count as input, so nothing is written (a 0-box COCO
    JSON was written before)."""
    root = tmp_path / "voc"
    (root / "annotations").mkdir(parents=True)
    (root / "images").mkdir()
    for name in ("r1", "r2"):
        Image.new("RGB", (64, 48)).save(root / "images" / f"{name}.jpg")
    (root / "annotations" / "r1.xml").write_text(_xml("r1.jpg", []))
    good = _xml("r2.jpg", [("raccoon", 2, 2, 9, 9, 0), ("raccoon", 3, 3, 20, 20, 0)])
    (root / "annotations" / "r2.xml").write_text(good.replace("</annotation>", ""))
    out = tmp_path / "out.json"
    result = CliRunner().invoke(app, ["convert", "-f", "voc", str(root), "--out", str(out)])
    assert isinstance(result.exception, DplError), result.output
    assert "all 2 boxes of the input were dropped, nothing written" in str(result.exception)
    assert not out.exists()
