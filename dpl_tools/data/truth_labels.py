"""Perfect pseudo labels: a COCO ground truth written in the pseudo-label format.

A benchmark diagnostic. A student trained on these learns its unlabeled images' true
boxes and classes through exactly the path that polished pseudo labels take (the same
mixing of labeled and pseudo-labeled images, augmentation and losses), so its score is
the ceiling of what any teacher and polisher could give that student. The oracle of the
benchmarks (the labeled-only recipe on every label) differs from it in its sampling; the
gap between the two is the recipe's, not the pseudo labels'.

Between the pseudo labels and that ceiling, ``truth_corrected_pseudo_labels`` corrects
chosen kinds of error from the truth: the boxes' localisation (each pseudo label on an
object gets that object's true box), the false positives (what a perfect keep rule would
give) or the missed objects (what a teacher of perfect recall would add), so a student on
each says which kind costs the student most.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpl_tools import __version__
from dpl_tools.data.coco import CocoData
from dpl_tools.data.pseudo_label_writer import append_row, empty_columns, rows_to_table
from dpl_tools.data.pseudo_labels import (
    META_BOXES,
    META_CATEGORIES,
    META_THRESHOLDS,
    META_VERSION,
    read_pseudo_labels,
)
from dpl_tools.data.pseudo_views import BOX_COORDS
from dpl_tools.evaluation.matching import box_iou_np, greedy_match
from dpl_tools.io import atomic_path

TRUTH_SOURCE = "truth"  # META_BOXES source of these files
# Errors truth_corrected_pseudo_labels can correct, in the order it applies them: boxes
# on an object take its true box, false positives become ignore regions, missed objects
# are added as kept rows
CORRECTIONS = ("boxes", "false-positives", "missed")


def _truth_row(base: dict, ann: dict) -> dict:
    """The pseudo-label row of one truth box: both views the true box and class, score and
    polisher probability 1, kept for both losses (a crowd region for neither)."""
    x, y, w, h = ann["bbox"]
    box = dict(zip(BOX_COORDS, (x, y, x + w, y + h), strict=True))
    cat, kept = ann["category_id"], not ann.get("iscrowd")
    return {**base, **{f"teacher_{c}": v for c, v in box.items()},
            **{f"polished_{c}": v for c, v in box.items()},
            "teacher_label": cat, "teacher_score": 1.0, "polished_label": cat,
            "polisher_prob": 1.0, "polisher_label": cat, "use_cls": kept,
            "use_reg": kept}  # fmt: skip


def truth_pseudo_labels(gt: CocoData) -> pa.Table:
    """One pseudo-label row per truth box, teacher and polished views both the true box and
    class, score and polisher probability 1, kept for classification and regression; a
    crowd region is a row kept for neither (an ignore region with ``--negatives ignore``).
    An image without boxes has its one empty row, as ``dpl polish`` writes it."""
    columns = empty_columns()
    by_image = gt.annotations_by_image()
    for im in gt.images:
        base = {"image_id": im["id"], "file_name": im["file_name"], "width": im["width"],
                "height": im["height"], "status": "ok"}  # fmt: skip
        anns = by_image.get(im["id"], [])
        if not anns:
            append_row(columns, base)
        for ann in anns:
            append_row(columns, _truth_row(base, ann))
    meta = {
        META_CATEGORIES: [{"id": c["id"], "name": c["name"]} for c in gt.categories],
        META_THRESHOLDS: {"keep_rule_source": TRUTH_SOURCE},
        META_BOXES: {"source": TRUTH_SOURCE, "file": str(gt.path)},
        META_VERSION: __version__,
    }
    return rows_to_table(columns, meta)


def _write(table: pa.Table, out: str | Path) -> Path:
    """``table`` written to ``out`` (a temporary file renamed on success)."""
    with atomic_path(out, ".parquet") as tmp:
        pq.write_table(table, tmp)
    return Path(out)


def write_truth_pseudo_labels(gt: CocoData, out: str | Path) -> Path:
    """``truth_pseudo_labels`` written to ``out``."""
    return _write(truth_pseudo_labels(gt), out)


def _kept_matches(rows: list[dict], anns: list[dict]) -> tuple[list[int], set[int]]:
    """Indices (into ``rows``) of the classification pseudo labels (teacher box, polished
    class) that match no true box of their class at IoU .5, and the indices (into ``anns``)
    of the true boxes some of them match: ``greedy_match`` by teacher score, as the
    classification view of ``dpl evaluate --pseudo`` counts them."""
    kept = [i for i, r in enumerate(rows) if r["use_cls"] and r["teacher_x1"] is not None]
    truth = [j for j, a in enumerate(anns) if not a.get("iscrowd")]
    boxes = np.array([[rows[i][f"teacher_{c}"] for c in BOX_COORDS] for i in kept],
                     dtype=np.float64).reshape(-1, 4)  # fmt: skip
    true_boxes = np.array([anns[j]["bbox"] for j in truth], dtype=np.float64).reshape(-1, 4)
    true_boxes[:, 2:] += true_boxes[:, :2]  # xywh -> xyxy
    labels = np.array([rows[i]["polished_label"] for i in kept])
    same = labels[:, None] == np.array([anns[j]["category_id"] for j in truth])[None, :]
    scores = np.array([rows[i]["teacher_score"] for i in kept], dtype=np.float64)
    match, _ = greedy_match(box_iou_np(boxes, true_boxes), scores, 0.5, same)
    wrong = [i for i, m in zip(kept, match, strict=True) if m < 0]
    return wrong, {truth[m] for m in match if m >= 0}


def _true_boxes(rows: list[dict], anns: list[dict]) -> list[dict]:
    """``rows`` with each box that lies on an object (class-agnostic ``greedy_match`` of the
    teacher boxes to the true boxes at IoU .5, by teacher score) moved onto that object's
    true box, in its teacher and polished views; classes, scores and keep flags stay."""
    placed = [i for i, r in enumerate(rows) if r["teacher_x1"] is not None]
    truth = [a for a in anns if not a.get("iscrowd")]
    boxes = np.array([[rows[i][f"teacher_{c}"] for c in BOX_COORDS] for i in placed],
                     dtype=np.float64).reshape(-1, 4)  # fmt: skip
    true_boxes = np.array([a["bbox"] for a in truth], dtype=np.float64).reshape(-1, 4)
    true_boxes[:, 2:] += true_boxes[:, :2]  # xywh -> xyxy
    scores = np.array([rows[i]["teacher_score"] for i in placed], dtype=np.float64)
    match, _ = greedy_match(box_iou_np(boxes, true_boxes), scores, 0.5)
    rows = list(rows)
    for i, m in zip(placed, match, strict=True):
        if m >= 0:
            box = dict(zip(BOX_COORDS, true_boxes[m].tolist(), strict=True))
            rows[i] = {**rows[i], **{f"{view}_{c}": v for view in ("teacher", "polished")
                                     for c, v in box.items()}}  # fmt: skip
    return rows


def truth_corrected_pseudo_labels(
    table: pa.Table, meta: dict, gt: CocoData, fix: str | Sequence[str]
) -> pa.Table:
    """``table``'s pseudo labels with the kinds of error in ``fix`` (one or several of
    ``CORRECTIONS``) corrected from ``gt``, in that order: "boxes": each box on an object
    (IoU .5, any class) becomes the object's true box; "false-positives": a classification
    pseudo label that matches no true box of its class (IoU .5) is kept for neither loss
    (an ignore region with ``--negatives ignore``); "missed": each true box that no
    classification pseudo label matches is added as a truth row. Everything else is left
    as it is; images are matched by file name."""
    fixes = {fix} if isinstance(fix, str) else set(fix)
    if not fixes or fixes - set(CORRECTIONS):
        raise ValueError(f"fix must be among {CORRECTIONS}, not {fix!r}")
    by_name = {im["file_name"]: im["id"] for im in gt.images}
    anns_of = gt.annotations_by_image()
    rows_of: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        rows_of.setdefault(row["file_name"], []).append(row)
    columns = empty_columns()
    for name, rows in rows_of.items():
        anns = anns_of.get(by_name.get(name), [])
        if "boxes" in fixes:
            rows = _true_boxes(rows, anns)
        wrong, found = _kept_matches(rows, anns)
        if "false-positives" in fixes:
            for i in wrong:
                rows[i] = {**rows[i], "use_cls": False, "use_reg": False}
        missed = [a for j, a in enumerate(anns) if j not in found and not a.get("iscrowd")]
        if "missed" in fixes and missed:
            base = {k: rows[0][k] for k in ("image_id", "file_name", "width", "height",
                                             "status")}  # fmt: skip
            rows = [r for r in rows if r["teacher_x1"] is not None]  # drop an empty image's row
            rows += [_truth_row(base, a) for a in missed]
        for row in rows:
            append_row(columns, row)
    corrected = "+".join(c for c in CORRECTIONS if c in fixes)
    boxes = {**meta.get(META_BOXES, {}), "corrected": corrected, "truth": str(gt.path)}
    return rows_to_table(columns, {**meta, META_BOXES: boxes})


def write_truth_corrected_pseudo_labels(
    labels: str | Path, gt: CocoData, fix: str | Sequence[str], out: str | Path
) -> Path:
    """The pseudo-label file ``labels`` with ``fix`` corrected (``truth_corrected_pseudo_labels``),
    written to ``out``."""
    table, meta = read_pseudo_labels(labels)
    return _write(truth_corrected_pseudo_labels(table, meta, gt, fix), out)
