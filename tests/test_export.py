"""COCO and YOLO exports of pseudo labels re-read to the same boxes, labels and images."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools.coco import COCO

from dpl_tools.data.coco import load_coco
from dpl_tools.data.export import to_coco, view_boxes, write_coco, write_yolo
from dpl_tools.data.pseudo_label_writer import rows_to_table
from dpl_tools.data.pseudo_labels import META_CATEGORIES
from dpl_tools.errors import DplError

CATS = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
META = {META_CATEGORIES: CATS}
BOX = ("x1", "y1", "x2", "y2")


def _row(image_id, name, teacher, polished, t_label, p_label, score, use_cls, use_reg=True):
    return {
        "image_id": image_id,
        "file_name": name,
        "width": 100,
        "height": 50,
        "status": "ok",
        **{f"teacher_{c}": v for c, v in zip(BOX, teacher, strict=True)},
        **{f"polished_{c}": v for c, v in zip(BOX, polished, strict=True)},
        "teacher_label": t_label,
        "teacher_score": score,
        "polished_label": p_label,
        "polisher_prob": 0.95,
        "use_cls": use_cls,
        "use_reg": use_reg,
    }


def _table():
    rows = [
        _row(1, "a/x.jpg", (10, 5, 30, 25), (12, 6, 32, 26), 3, 7, 0.6, True),
        _row(1, "a/x.jpg", (50, 10, 90, 40), (51, 11, 91, 41), 7, 7, 0.55, False),
        _row(2, "y.png", (0, 0, 100, 50), (1, 1, 99, 49), 3, 3, 0.97, True),
        {"image_id": 3, "file_name": "empty.png", "width": 100, "height": 50, "status": "ok"},
        {"image_id": 4, "file_name": "bad.jpg", "status": "skipped", "error": "empty file"},
    ]
    cols = {name: [r.get(name) for r in rows] for name in rows[0] | rows[3] | rows[4]}
    return rows_to_table(cols)


def test_views_select_the_documented_rows():
    table = _table()
    polished = view_boxes(table, "polished")
    assert polished["labels"].tolist() == [7, 3]
    np.testing.assert_allclose(polished["boxes"][0], [12, 6, 32, 26])
    assert view_boxes(table, "cls")["boxes"][0].tolist() == [10, 5, 30, 25]
    assert view_boxes(table, "reg")["labels"].tolist() == [3, 7, 3]
    assert len(view_boxes(table, "teacher")["labels"]) == 3
    assert [name for _, name, _, _ in polished["images"]] == ["a/x.jpg", "y.png", "empty.png"]
    with pytest.raises(DplError):
        view_boxes(table, "nope")


def test_coco_export_rereads(tmp_path):
    path = tmp_path / "pseudo.json"
    assert write_coco(_table(), META, path, "polished") == 2
    coco = load_coco(path)  # the project's own validator accepts it
    assert [c["id"] for c in coco.categories] == [3, 7]
    assert sorted(i["file_name"] for i in coco.images) == ["a/x.jpg", "empty.png", "y.png"]
    api = COCO(str(path))
    anns = api.loadAnns(api.getAnnIds(imgIds=[1]))
    assert len(anns) == 1 and anns[0]["category_id"] == 7
    np.testing.assert_allclose(anns[0]["bbox"], [12, 6, 20, 20])
    assert anns[0]["score"] == pytest.approx(0.6)
    assert api.getAnnIds(imgIds=[3]) == []
    assert to_coco(_table(), META, "teacher")["annotations"][1]["category_id"] == 7


def test_yolo_export_rereads(tmp_path):
    out = tmp_path / "labels"
    assert write_yolo(_table(), META, out, "reg") == 3
    assert (out / "classes.txt").read_text().split() == ["cat", "dog"]
    lines = (out / "a" / "x.txt").read_text().splitlines()
    assert len(lines) == 2
    cls, cx, cy, w, h = (float(v) for v in lines[0].split())
    assert cls == 0  # category 3 is the first class
    box = [(cx - w / 2) * 100, (cy - h / 2) * 50, (cx + w / 2) * 100, (cy + h / 2) * 50]
    np.testing.assert_allclose(box, [12, 6, 32, 26], atol=1e-3)
    assert (out / "empty.txt").read_text() == ""
    assert not (out / "bad.txt").exists()
    # Rewriting replaces the folder whole.
    write_yolo(_table(), META, out, "polished")
    assert len((out / "a" / "x.txt").read_text().splitlines()) == 1
