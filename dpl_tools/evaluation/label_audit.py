"""Likely mistakes in the human labels of the labeled set (``dpl audit``), found with the
out-of-fold detections of cross-fitting (``crossfit.parquet``): no fold teacher saw the
image it detected on, so where it disagrees confidently with a label, the label may be
wrong (the idea of cleanlab's object-detection label-issue scores).

Three kinds of issue, each scored in [0, 1] (higher: more likely a mistake):

- ``missing``: a detection with score >= ``min_score`` that overlaps no truth box (IoU
  below ``overlap_iou`` with every one): an object nobody labelled. Score: its score.
- ``wrong_class``: a truth box that a detection of another class covers (IoU >= 0.5,
  score >= ``min_score``) while its own class's best covering detection (any score) stays
  below that class's self-confidence: the mean, over the truth boxes of the class, of
  their own class's best covering score (confident learning's per-class threshold, as in
  cleanlab: a class the fold teachers find weakly is not flagged for being found weakly).
  Score: the other detection's score minus the own class's (the margin).
- ``misplaced``: a truth box whose best detection of its own class overlaps it only
  partly (``overlap_iou`` <= IoU < 0.5). Score: the detection's score x (1 - IoU).

Images the fold teachers did not see (not in the file) are not audited.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dpl_tools.data.coco import CocoData
from dpl_tools.data.crossfit_detections import ImageDetections
from dpl_tools.data.pseudo_views import BOX_COORDS
from dpl_tools.evaluation.matching import box_iou_np

ISSUES = ("missing", "wrong_class", "misplaced")
AUDIT_SCHEMA = pa.schema([
    ("issue", pa.string()), ("score", pa.float64()), ("image_id", pa.int64()),
    ("file_name", pa.string()), ("annotation_id", pa.int64()), ("category", pa.string()),
    ("suggested_category", pa.string()), ("x1", pa.float64()), ("y1", pa.float64()),
    ("x2", pa.float64()), ("y2", pa.float64()), ("suggested_x1", pa.float64()),
    ("suggested_y1", pa.float64()), ("suggested_x2", pa.float64()),
    ("suggested_y2", pa.float64()), ("iou", pa.float64()),
])  # fmt: skip


def _issue(kind: str, score: float, image: dict, names: dict[int, str], **fields: Any) -> dict:
    row = {name: None for name in AUDIT_SCHEMA.names}
    row.update(issue=kind, score=round(float(score), 6), image_id=int(image["id"]),
               file_name=image["file_name"])  # fmt: skip
    for key in ("category", "suggested_category"):
        if key in fields:
            fields[key] = names.get(int(fields[key]), str(fields[key]))
    for prefix, key in (("", "box"), ("suggested_", "suggested_box")):
        box = fields.pop(key, None)
        if box is not None:
            row.update({f"{prefix}{c}": float(v) for c, v in zip(BOX_COORDS, box,
                                                                 strict=True)})  # fmt: skip
    row.update(fields)
    return row


def _truth_boxes(anns: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    truth = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                     np.float64).reshape(-1, 4)  # fmt: skip
    return truth, np.array([a["category_id"] for a in anns], np.int64)


def own_class_scores(anns: list[dict], det: ImageDetections) -> np.ndarray:
    """Per truth box: the best score of a detection of its own class covering it (IoU >=
    0.5, any score in the file; 0 when none)."""
    truth, classes = _truth_boxes(anns)
    if not len(det.scores) or not len(truth):
        return np.zeros(len(truth))
    covers = box_iou_np(det.boxes.astype(np.float64), truth) >= 0.5
    own = covers & (det.labels[:, None] == classes[None, :])
    return np.where(own, det.scores[:, None].astype(np.float64), 0.0).max(axis=0)


def audit_image(
    image: dict, anns: list[dict], det: ImageDetections, names: dict[int, str],
    min_score: float, overlap_iou: float, confidence: dict[int, float] | None = None,
    own_best: np.ndarray | None = None,
) -> list[dict]:  # fmt: skip
    """The issues of one labeled image (see the module docstring); ``confidence``: the
    per-class self-confidence (``class_confidence``; None: 1 for every class);
    ``own_best``: its ``own_class_scores`` when already computed."""
    d = det.at_least(min_score)
    truth, classes = _truth_boxes(anns)
    own_best = own_class_scores(anns, det) if own_best is None else own_best
    iou = box_iou_np(d.boxes.astype(np.float64), truth)  # [detections, truths]
    out = []
    for j in range(len(d.scores)):
        if len(truth) == 0 or iou[j].max() < overlap_iou:
            found = {"category": d.labels[j], "suggested_category": d.labels[j]}
            out.append(_issue("missing", d.scores[j], image, names, **found,
                              suggested_box=d.boxes[j]))  # fmt: skip
    for t, ann in enumerate(anns):
        column = iou[:, t] if len(d.scores) else np.zeros(0)
        own = d.labels == classes[t]
        if (column[own] >= 0.5).any():
            continue
        other = np.flatnonzero(~own & (column >= 0.5))
        common = {"annotation_id": int(ann["id"]), "category": classes[t], "box": truth[t]}
        threshold = 1.0 if confidence is None else confidence.get(int(classes[t]), 1.0)
        if len(other) and own_best[t] < threshold:
            j = other[np.argmax(d.scores[other])]
            out.append(_issue("wrong_class", d.scores[j] - own_best[t], image, names,
                              iou=float(column[j]), suggested_category=d.labels[j],
                              suggested_box=d.boxes[j], **common))  # fmt: skip
            continue
        near = np.flatnonzero(own & (column >= overlap_iou))
        if len(near):
            j = near[np.argmax(column[near])]
            score = float(d.scores[j]) * (1.0 - float(column[j]))
            out.append(_issue("misplaced", score, image, names, iou=float(column[j]),
                              suggested_category=classes[t], suggested_box=d.boxes[j],
                              **common))  # fmt: skip
    return out


def _annotations_by_image(gt: CocoData) -> dict[int, list[dict]]:
    anns_of: dict[int, list[dict]] = {}
    for a in gt.annotations:
        if not a.get("iscrowd"):
            anns_of.setdefault(a["image_id"], []).append(a)
    return anns_of


def _own_scores_by_image(
    gt: CocoData, anns_of: dict[int, list[dict]], detections: dict[str, ImageDetections]
) -> dict[int, np.ndarray]:
    """``own_class_scores`` of every audited image (one with detections), by image id."""
    return {
        image["id"]: own_class_scores(anns_of.get(image["id"], []), det)
        for image in gt.images
        if (det := detections.get(image["file_name"])) is not None
    }


def _mean_by_class(anns_of: dict[int, list[dict]], own: dict[int, np.ndarray]) -> dict[int, float]:
    scores: dict[int, list[float]] = {}
    for image_id, best in own.items():
        for a, s in zip(anns_of.get(image_id, []), best, strict=True):
            scores.setdefault(int(a["category_id"]), []).append(float(s))
    return {c: float(np.mean(v)) for c, v in scores.items()}


def class_confidence(gt: CocoData, detections: dict[str, ImageDetections]) -> dict[int, float]:
    """Per class: the mean own-class best score of its truth boxes on the audited images
    (confident learning's per-class self-confidence threshold)."""
    anns_of = _annotations_by_image(gt)
    return _mean_by_class(anns_of, _own_scores_by_image(gt, anns_of, detections))


def audit_labels(
    gt: CocoData, detections: dict[str, ImageDetections], min_score: float = 0.5,
    overlap_iou: float = 0.1,
) -> pa.Table:  # fmt: skip
    """Every issue of the images of ``gt`` that ``detections`` (out-of-fold, by file
    name) cover, most likely first, as a table in ``AUDIT_SCHEMA``."""
    names = {int(c["id"]): str(c["name"]) for c in gt.categories}
    anns_of = _annotations_by_image(gt)
    own = _own_scores_by_image(gt, anns_of, detections)  # once: the threshold and the flags
    confidence = _mean_by_class(anns_of, own)
    rows: list[dict] = []
    for image in gt.images:
        det = detections.get(image["file_name"])
        if det is not None:
            rows += audit_image(image, anns_of.get(image["id"], []), det, names, min_score,
                                overlap_iou, confidence, own[image["id"]])  # fmt: skip
    rows.sort(key=lambda r: (-r["score"], r["file_name"], r["issue"]))
    return pa.Table.from_pylist(rows, schema=AUDIT_SCHEMA)


def write_audit(table: pa.Table, out: str | Path, csv: str | Path | None = None) -> None:
    """The audit as Parquet (and CSV), each written atomically."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from dpl_tools.io import atomic_path

    with atomic_path(out, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)
    if csv is not None:
        with atomic_path(csv, suffix=".csv") as tmp:
            pcsv.write_csv(table, tmp)
