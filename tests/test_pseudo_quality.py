"""Pseudo-label quality on hand-built cases whose answers are worked out by hand."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from rich.console import Console

from dpl_tools.data.coco import validate_coco
from dpl_tools.data.pseudo_labels import META_CATEGORIES, SCHEMA
from dpl_tools.errors import DplError
from dpl_tools.evaluation.pseudo_quality import (
    greedy_match,
    pseudo_label_quality,
    scored_against_truth,
)
from dpl_tools.evaluation.quality_tables import format_quality_table


def row(name, image_id, teacher=None, t_label=None, score=None, polished=None, p_label=None,
        prob=None, use_cls=False, use_reg=False, status="ok"):  # fmt: skip
    r = {"image_id": image_id, "file_name": name, "width": 100, "height": 100, "status": status}
    if status != "ok":
        r["error"] = "corrupt"
    if teacher is not None:
        r.update(
            {f"teacher_{c}": v for c, v in zip(("x1", "y1", "x2", "y2"), teacher, strict=True)}
        )
        r.update(
            {f"polished_{c}": v for c, v in zip(("x1", "y1", "x2", "y2"), polished, strict=True)}
        )
        r.update(teacher_label=t_label, teacher_score=score, polished_label=p_label)
        r.update(polisher_prob=prob, use_cls=use_cls, use_reg=use_reg)
    return r


def gt_data(images, annotations):
    raw = {
        "images": [{"id": i, "file_name": n, "width": 100, "height": 100} for i, n in images],
        "annotations": [
            {"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "iscrowd": 0}
            for k, (i, c, b) in enumerate(annotations)
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    return validate_coco(raw, "gt.json")


@pytest.fixture
def case():
    """Image a.png: truths G1 = [0,0,10,10] class 1 and G2 = [20,0,30,10] class 2.

    P1 teacher = G1 (IoU 1), label 1, score .9; polished [0,0,10,7.2] (IoU .72).
    P2 teacher [20,0,30,8.2] (IoU .82 with G2), label 1 (wrong), score .8; polisher
       changes it to 2 (right); polished box = G2 (IoU 1).
    P3 teacher [0,0,10,5] (IoU .5 with G1), label 1, score .6, dropped from cls;
       polished [0,0,10,6] (IoU .6).
    c.png: looked at, nothing found, no truth. b.png: skipped. d.png: not in the truth.
    """
    rows = [
        row("a.png", 1, [0, 0, 10, 10], 1, 0.9, [0, 0, 10, 7.2], 1, 0.95, True, True),
        row("a.png", 1, [20, 0, 30, 8.2], 1, 0.8, [20, 0, 30, 10], 2, 0.97, True, True),
        row("a.png", 1, [0, 0, 10, 5], 1, 0.6, [0, 0, 10, 6], 1, 0.4, False, True),
        row("c.png", 3),
        row("b.png", 2, status="skipped"),
        row("d.png", 99, [0, 0, 10, 10], 1, 0.9, [0, 0, 10, 10], 1, 0.9, True, True),
    ]
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    gt = gt_data(
        [(1, "a.png"), (2, "b.png"), (3, "c.png")],
        [(1, 1, [0, 0, 10, 10]), (1, 2, [20, 0, 10, 10])],
    )
    return table, gt


def test_views_precision_recall_iou_and_ap(case):
    table, gt = case
    res = pseudo_label_quality(table, gt)
    assert res["images"] == {
        "ok": 3, "skipped": 1, "not_in_gt": 1, "evaluated": 2, "matched_by_id": 0
    }  # fmt: skip
    assert res["gt_boxes"] == 2
    t, c, r = (res["views"][v] for v in ("teacher", "cls", "reg"))
    # teacher: only P1 matches class-aware (P2 has the wrong class, P3 finds G1 taken)
    assert t["boxes"] == 3
    assert t["precision50"] == pytest.approx(1 / 3) and t["recall50"] == pytest.approx(1 / 2)
    assert t["precision75"] == pytest.approx(1 / 3) and t["recall75"] == pytest.approx(1 / 2)
    # class-agnostic box quality: P1 -> G1 (1.0), P2 -> G2 (.82), P3 unmatched
    assert t["matched_boxes"] == 2 and t["mean_iou"] == pytest.approx(0.91, abs=1e-5)
    # AP: class 1 perfect, class 2 never predicted
    assert (t["AP"], t["AP50"], t["AP75"]) == pytest.approx((0.5, 0.5, 0.5))
    # classification pseudo labels: P1 and the corrected P2, both right
    assert c["boxes"] == 2
    assert (c["precision50"], c["recall50"], c["precision75"], c["recall75"]) == (1, 1, 1, 1)
    assert c["mean_iou"] == pytest.approx(0.91, abs=1e-5)
    # class 2's box (IoU .82) counts at thresholds .50..80: 7 of 10
    assert (c["AP"], c["AP50"], c["AP75"]) == pytest.approx((0.85, 1.0, 1.0))
    # regression pseudo labels: polished boxes with teacher labels; P1 (IoU .72) only at .5
    assert r["boxes"] == 3
    assert r["precision50"] == pytest.approx(1 / 3) and r["recall50"] == pytest.approx(1 / 2)
    assert r["precision75"] == 0 and r["recall75"] == 0
    assert r["mean_iou"] == pytest.approx((0.72 + 1.0) / 2, abs=1e-5)
    # class 1: P1 matches at IoU .50..70 (5 of 10 thresholds); class 2: nothing
    assert (r["AP"], r["AP50"], r["AP75"]) == pytest.approx((0.25, 0.5, 0.0))


def test_label_changes_drops_and_iou_before_after(case):
    table, gt = case
    res = pseudo_label_quality(table, gt)
    assert res["label_changes"] == {"changed": 1, "right": 1, "broke": 0, "no_truth": 0}
    assert res["cls_dropped"] == {"dropped": 1, "true_positive": 0, "false_positive": 1}
    before, after = res["iou_to_truth"]["before"], res["iou_to_truth"]["after"]
    np.testing.assert_allclose(before, [1.0, 0.82, 0.5], atol=1e-4)
    np.testing.assert_allclose(after, [0.72, 1.0, 0.6], atol=1e-4)
    bq = res["box_quality"]
    assert bq["boxes"] == 3
    assert bq["mean_iou_before"] == pytest.approx(2.32 / 3, abs=1e-5)
    assert bq["mean_iou_after"] == pytest.approx(2.32 / 3, abs=1e-5)
    assert bq["improved_fraction"] == pytest.approx(2 / 3)
    curve = res["pr_curves"]["teacher"]
    assert curve["precision"] == pytest.approx([1.0, 0.5, 1 / 3], abs=1e-4)
    assert curve["recall"] == pytest.approx([0.5, 0.5, 0.5])


def test_broken_label_and_fallback_to_image_id():
    """File names differ from the truth's, so images match by id; the polisher changes a
    right label (broke) and changes one with no truth nearby."""
    rows = [
        row("x/a.png", 1, [0, 0, 10, 10], 1, 0.7, [0, 0, 10, 10], 2, 0.95, True, True),
        row("x/a.png", 1, [50, 50, 60, 60], 1, 0.6, [50, 50, 60, 60], 2, 0.95, True, True),
    ]
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    gt = gt_data([(1, "a.png")], [(1, 1, [0, 0, 10, 10])])
    res = pseudo_label_quality(table, gt)
    assert res["images"]["matched_by_id"] == 1 and res["images"]["evaluated"] == 1
    assert res["label_changes"] == {"changed": 2, "right": 0, "broke": 1, "no_truth": 1}
    assert res["views"]["teacher"]["precision50"] == pytest.approx(0.5)
    assert res["views"]["cls"]["precision50"] == 0 and res["views"]["cls"]["AP"] == 0
    assert res["cls_dropped"]["dropped"] == 0


def test_greedy_match_follows_score_not_iou():
    iou = np.array([[0.6], [0.9]])
    match, m_iou = greedy_match(iou, np.array([0.9, 0.5]), 0.5)
    assert match.tolist() == [0, -1] and m_iou.tolist() == [0.6, 0.0]
    match, _ = greedy_match(iou, np.array([0.9, 0.5]), 0.7)
    assert match.tolist() == [-1, 0]  # at .7 the high-score box no longer qualifies
    same = np.array([[False], [True]])
    match, _ = greedy_match(iou, np.array([0.9, 0.5]), 0.5, same)
    assert match.tolist() == [-1, 0]


def test_format_quality_table(case):
    table, gt = case
    console = Console(record=True, width=200)
    console.print(format_quality_table(pseudo_label_quality(table, gt)))
    text = console.export_text()
    assert "classification pseudo labels" in text and "0.850" in text
    assert "labels changed by the polisher: 1 (1 right" in text


def test_per_class_figures_add_up_to_the_view(case):
    """Worked out by hand from the case: the teacher's three boxes are all class 1 (cat),
    one right (P1); the classification view has P1 (cat) and the corrected P2 (dog)."""
    from dpl_tools.evaluation.quality_tables import format_class_table

    table, gt = case
    res = pseudo_label_quality(table, gt)
    t, c = res["views"]["teacher"]["per_class"], res["views"]["cls"]["per_class"]
    assert t["cat"] == {"gt_boxes": 1, "boxes": 3, "precision50": pytest.approx(1 / 3),
                        "recall50": 1.0, "AP": 1.0}  # fmt: skip
    assert t["dog"]["boxes"] == 0 and t["dog"]["recall50"] == 0 and t["dog"]["AP"] == 0
    assert c["dog"] == {"gt_boxes": 1, "boxes": 1, "precision50": 1.0, "recall50": 1.0,
                        "AP": pytest.approx(0.7)}  # fmt: skip
    for view in res["views"].values():  # the classes' true positives are the view's
        hits = sum(round(k["precision50"] * k["boxes"]) for k in view["per_class"].values()
                   if k["boxes"])  # fmt: skip
        assert hits == round(view["precision50"] * view["boxes"])
        assert sum(k["gt_boxes"] for k in view["per_class"].values()) == res["gt_boxes"]
    console = Console(width=80, record=True)
    console.print(format_class_table(res))
    text = console.export_text()
    assert "cat" in text and "dog" in text and "0.333 / 1.000 / 1.000" in text


def test_a_truth_that_does_not_fit_the_pseudo_labels_is_refused(case):
    table, gt = case
    meta = {META_CATEGORIES: [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    figures = scored_against_truth(table, meta, gt, "p.parquet")
    assert figures["images"]["evaluated"] == 2  # the same scores as pseudo_label_quality
    swapped = {META_CATEGORIES: [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}]}
    with pytest.raises(DplError, match=r"p.parquet: pseudo-label categories .* differ from"):
        scored_against_truth(table, swapped, gt, "p.parquet")
    other = gt_data([(7, "x.png")], [(7, 1, [0, 0, 5, 5])])
    with pytest.raises(DplError, match=r"gt.json: none of the 3 image\(s\) of p.parquet is in"):
        scored_against_truth(table, meta, other, "p.parquet")
