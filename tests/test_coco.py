"""COCO loading and validation: every fatal error and every counted repair."""

from __future__ import annotations

import copy
import json

import pytest

from dpl_tools.data.coco import ValidationReport, load_coco, save_coco, validate_coco
from dpl_tools.errors import DplError


def _raw() -> dict:
    return {
        "info": {"description": "t"},
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
            {"id": 2, "file_name": "b.jpg", "width": 50, "height": 50},
        ],
        "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 30]},
            {"id": 2, "image_id": 2, "category_id": 3, "bbox": [0, 0, 5, 5], "area": 25},
        ],
    }


def test_clean_set_loads_with_contiguous_labels(tmp_path):
    path = save_coco(_raw(), tmp_path / "ann.json")
    coco = load_coco(path)
    assert coco.report.clean and coco.report.lines() == []
    assert coco.category_names == ["cat", "dog"]
    assert coco.cat_to_label == {7: 1, 3: 2} and coco.label_to_cat == {1: 7, 2: 3}
    assert coco.annotations[0]["area"] == 600.0 and coco.annotations[0]["iscrowd"] == 0
    assert coco.to_dict()["info"] == {"description": "t"}
    assert {k: len(v) for k, v in coco.annotations_by_image().items()} == {1: 1, 2: 1}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.pop("categories"), "missing top-level key(s) categories"),
        (lambda r: r.pop("annotations"), "missing top-level key(s) annotations"),
        (lambda r: r["images"].append(dict(r["images"][0])), "1 duplicate image id(s)"),
        (lambda r: r["categories"].append({"id": 3, "name": "x"}), "duplicate category id"),
        (lambda r: r["annotations"].append(dict(r["annotations"][0])), "duplicate annotation"),
        (lambda r: [a.pop("bbox") for a in r["annotations"]], "2 annotation(s) missing"),
        (lambda r: r["images"][1].pop("width"), "image #1 lacks width"),
        (lambda r: r["categories"][0].pop("name"), "category #0 lacks name"),
        (lambda r: r["images"][0].update(width=0), "without a positive width/height"),
        (lambda r: r.update(images={}), "'images' must be a list"),
    ],
)
def test_structural_problems_are_fatal_and_name_the_file(mutate, message):
    raw = _raw()
    mutate(raw)
    with pytest.raises(DplError, match="ann.json") as e:
        validate_coco(raw, "ann.json")
    assert message in str(e.value)


def test_unreadable_json_and_wrong_top_level(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DplError, match="bad.json: not valid JSON"):
        load_coco(bad)
    with pytest.raises(DplError, match="missing.json: file not found"):
        load_coco(tmp_path / "missing.json")
    with pytest.raises(DplError, match="top level must be a JSON object"):
        validate_coco([1, 2], "x.json")


def test_box_problems_are_repaired_and_counted():
    raw = _raw()
    raw["annotations"] += [
        {"id": 10, "image_id": 1, "category_id": 7, "bbox": [5, 5, 0, 10]},  # zero width
        {"id": 11, "image_id": 1, "category_id": 7, "bbox": [5, 5, 10, -2]},  # negative
        {"id": 12, "image_id": 1, "category_id": 99, "bbox": [5, 5, 10, 10]},  # unknown cat
        {"id": 13, "image_id": 42, "category_id": 7, "bbox": [5, 5, 10, 10]},  # unknown image
        {"id": 14, "image_id": 1, "category_id": 7, "bbox": [-10, 70, 50, 20], "area": 1000},
        {"id": 15, "image_id": 1, "category_id": 7, "bbox": [120, 10, 10, 10]},  # outside
        {"id": 16, "image_id": 1, "category_id": 7, "bbox": [1, 2, 3]},
        {"id": 17, "image_id": 1, "category_id": 7, "bbox": [1, "x", 3, 4]},
        {"id": 18, "image_id": 1, "category_id": 7, "bbox": [1, float("nan"), 3, 4]},
    ]
    coco = validate_coco(raw, "ann.json")
    counts = coco.report.counts
    assert counts == {
        "zero or negative size box (dropped)": 2,
        "unknown category id (annotation dropped)": 1,
        "unknown image id (annotation dropped)": 1,
        "box outside its image (clipped)": 1,
        "box entirely outside its image (dropped)": 1,
        "malformed bbox (annotation dropped)": 3,
    }
    assert [a["id"] for a in coco.annotations] == [1, 2, 14]
    clipped = coco.annotations[2]
    assert clipped["bbox"] == [0.0, 70.0, 40.0, 10.0] and clipped["area"] == 400.0
    lines = coco.report.lines()
    assert len(lines) == 6
    assert "ann.json: 2 x zero or negative size box (dropped) (e.g. annotation 10 (a.jpg)" in (
        "\n".join(lines)
    )
    assert raw["annotations"][6]["bbox"] == [-10, 70, 50, 20]  # input not modified


def test_missing_image_files_are_dropped_with_their_boxes(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    coco = validate_coco(_raw(), "ann.json", images_dir=tmp_path)
    assert [im["id"] for im in coco.images] == [1]
    assert [a["id"] for a in coco.annotations] == [1]
    assert coco.report.counts == {
        "missing image file (image dropped)": 1,
        "annotation of a dropped image (dropped)": 1,
    }
    assert coco.report.examples["missing image file (image dropped)"] == str(tmp_path / "b.jpg")


def test_images_only_file_and_report_merge():
    raw = copy.deepcopy(_raw())
    raw.pop("annotations")
    coco = validate_coco(raw, "u.json", require_annotations=False)
    assert len(coco.images) == 2 and coco.annotations == []
    a, b = ValidationReport("x"), ValidationReport("y")
    a.add("p", "first")
    b.add("p", "other")
    b.add("q", "q1")
    a.merge(b)
    assert a.counts == {"p": 2, "q": 1} and a.examples == {"p": "first", "q": "q1"}


def test_save_coco_roundtrip(tmp_path):
    coco = validate_coco(_raw(), "ann.json")
    out = save_coco(coco, tmp_path / "sub" / "out.json")
    assert json.loads(out.read_text())["annotations"] == coco.annotations
    assert [p.name for p in out.parent.iterdir()] == ["out.json"]  # no temp file left


def test_truth_by_file_is_xyxy_by_file_name_without_crowds():
    raw = _raw()
    raw["images"].append({"id": 3, "file_name": "c.jpg", "width": 40, "height": 40})
    raw["annotations"].append(
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [0, 0, 50, 40], "iscrowd": 1}
    )
    truth = validate_coco(raw, "ann.json").truth_by_file()
    assert sorted(truth) == ["a.jpg", "b.jpg", "c.jpg"]
    boxes, cats = truth["a.jpg"]
    assert boxes.tolist() == [[10.0, 10.0, 30.0, 40.0]] and cats.tolist() == [7]  # crowd out
    assert truth["b.jpg"][0].tolist() == [[0.0, 0.0, 5.0, 5.0]] and truth["b.jpg"][1].tolist() == [
        3
    ]
    assert truth["c.jpg"][0].shape == (0, 4) and truth["c.jpg"][1].shape == (0,)


@pytest.mark.parametrize("value", ["yes", "0", "1", None, 2, -1, 0.5, 1.0, [1], {"x": 1}])
def test_iscrowd_other_than_0_or_1_is_refused_naming_the_annotation(value):
    """pycocotools reads iscrowd with int(): "yes" crashed later readers, and dpl took the
    string "0" for a crowd box where pycocotools does not; only 0 / 1 (or absent) pass."""
    raw = _raw()
    raw["annotations"][1]["iscrowd"] = value
    with pytest.raises(DplError) as e:
        validate_coco(raw, "ann.json")
    message = str(e.value)
    assert message.startswith("ann.json: 1 annotation(s) with an invalid iscrowd (e.g. ")
    assert f"annotation 2: iscrowd = {json.dumps(value)})" in message and "\n" not in message


def test_iscrowd_0_1_and_json_booleans_are_accepted():
    raw = _raw()
    raw["annotations"].append(
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 1}
    )
    raw["annotations"][0]["iscrowd"] = 0
    coco = validate_coco(raw, "ann.json")
    assert [a["iscrowd"] for a in coco.annotations] == [0, 0, 1]  # absent: 0
    raw["annotations"][0]["iscrowd"], raw["annotations"][2]["iscrowd"] = False, True
    coco = validate_coco(raw, "ann.json")
    crowd = [a["iscrowd"] for a in coco.annotations]
    assert crowd == [0, 0, 1] and all(type(v) is int for v in crowd)  # stored as pycocotools' ints
