"""Per-image student targets from a pseudo-label table, for each supervision view: the
table's grouping (``pseudo_images``) and the production target builder
(``student_target``), as the student's dataset uses them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from dpl_tools.data.pseudo_labels import SCHEMA
from dpl_tools.data.pseudo_targets import pseudo_images
from dpl_tools.errors import DplError
from dpl_tools.models.student_criterion import student_target, supervision

LABELS = {1: 1, 2: 2}  # COCO id -> detector label (the same here)


def targets(table: pa.Table, view: str = "polished", disentangle: bool = True) -> dict:
    """file name -> (image rows, detector target) under a view."""
    chosen = supervision(view, disentangle)
    out = {}
    for image in pseudo_images(table):
        target, dropped = student_target(image, chosen, LABELS)
        assert dropped == 0
        out[image.file_name] = (image, {k: v.numpy() for k, v in target.items()})
    return out


def _row(
    name, box=None, label=None, score=None, pbox=None, plabel=None, cls=None, reg=None, status="ok"
):
    tb = box or (None,) * 4
    pb = pbox or (None,) * 4
    return {
        "image_id": {"a.png": 1, "b.png": 2, "c.png": 3}[name],
        "file_name": name,
        "width": 100,
        "height": 80,
        "status": status,
        "error": None if status == "ok" else "corrupt",
        "teacher_x1": tb[0],
        "teacher_y1": tb[1],
        "teacher_x2": tb[2],
        "teacher_y2": tb[3],
        "teacher_label": label,
        "teacher_score": score,
        "polished_x1": pb[0],
        "polished_y1": pb[1],
        "polished_x2": pb[2],
        "polished_y2": pb[3],
        "polished_label": plabel,
        "polisher_prob": None if box is None else 0.5,
        "use_cls": cls,
        "use_reg": reg,
    }


@pytest.fixture()
def table() -> pa.Table:
    rows = [
        # kept for both; polisher changed the label 1 -> 2
        _row("a.png", (10, 10, 30, 30), 1, 0.6, (11, 12, 31, 33), 2, True, True),
        # regression only (classification polisher not confident)
        _row("a.png", (50, 40, 70, 60), 1, 0.7, (52, 41, 69, 62), 1, False, True),
        # classification only
        _row("a.png", (5, 50, 20, 70), 2, 0.95, (6, 50, 21, 71), 2, True, False),
        _row("b.png"),  # processed, nothing found
        _row("c.png", status="skipped"),
    ]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def test_disentangled_view_splits_classification_and_regression_labels(table) -> None:
    by_name = targets(table)
    assert set(by_name) == {"a.png", "b.png"}  # skipped image left out
    _, a = by_name["a.png"]
    np.testing.assert_array_equal(a["boxes"], [[10, 10, 30, 30], [5, 50, 20, 70]])
    np.testing.assert_array_equal(a["labels"], [2, 2])  # polished labels
    np.testing.assert_array_equal(a["reg_boxes"], [[11, 12, 31, 33], [52, 41, 69, 62]])
    np.testing.assert_array_equal(a["reg_labels"], [1, 1])  # teacher labels
    b_image, b = by_name["b.png"]
    assert b["boxes"].shape == (0, 4) and b["reg_boxes"].shape == (0, 4)
    assert (b_image.width, b_image.height, len(b_image)) == (100, 80, 0)


def test_polished_without_disentangling_uses_one_set_for_everything(table) -> None:
    _, a = targets(table, disentangle=False)["a.png"]
    np.testing.assert_array_equal(a["boxes"], [[11, 12, 31, 33], [6, 50, 21, 71]])
    np.testing.assert_array_equal(a["labels"], [2, 2])
    assert "reg_boxes" not in a and "reg_labels" not in a  # one set for every loss


def test_raw_view_is_every_teacher_box_with_teacher_label(table) -> None:
    for disentangle in (True, False):  # raw has one set whatever --disentangle says
        _, a = targets(table, view="raw", disentangle=disentangle)["a.png"]
        np.testing.assert_array_equal(
            a["boxes"], [[10, 10, 30, 30], [50, 40, 70, 60], [5, 50, 20, 70]]
        )
        np.testing.assert_array_equal(a["labels"], [1, 1, 2])
        assert "reg_boxes" not in a


def test_unknown_view_is_a_clear_error(table) -> None:
    with pytest.raises(DplError, match="unknown pseudo-label view"):
        supervision("sharpened")
