"""Quality of pseudo labels against ground truth: the teacher view vs the polished views.

Three views of one pseudo-label table (sets of ``dpl_tools.data.pseudo_views.LABEL_SETS``)
are scored side by side:

- ``teacher``: every row with a box (teacher box, teacher label, teacher score);
- ``cls``: the classification pseudo labels, rows with ``use_cls`` (teacher box,
  polished label);
- ``reg``: the regression pseudo labels, rows with ``use_reg`` (polished box, teacher
  label).

A view's rows are those of its set that hold its box and label.

Every view is ranked by the teacher score. Precision and recall at IoU 0.5 / 0.75 use
COCO's greedy matching: predictions in descending score order, each takes the unmatched
ground-truth box *of its class* with the highest IoU (at least the threshold), one truth
per prediction. The box-quality figure ``mean_iou`` uses the same greedy matching but
*class-agnostic* at IoU >= 0.5, so that label errors do not hide box errors. AP comes
from pycocotools on the same images. Only rows with ``status == "ok"`` count; images are
matched to the ground truth by file name, else by image id; crowd annotations are ignored.

Box quality before/after polishing (``box_quality``: every box whose teacher box has IoU
>= 0.5 with its truth) is also broken down per teacher-score bin (``SCORE_BIN_EDGES``)
and per COCO object size of the truth (``SIZE_AREAS``), to show where polishing helps.

The keep rule (``keep_rule``): the classification pseudo labels against the teacher's
boxes with score >= 0.5 (precision / recall at IoU 0.5, class-aware; the recall lost);
``label_changes``: labels the polisher changed, and how many of those are right (the
class of the truth the teacher box overlaps most, at IoU >= 0.5).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dpl_tools.data.coco import CocoData
from dpl_tools.data.pseudo_labels import drop_unusable_rows
from dpl_tools.data.pseudo_views import BOX_COORDS, LABEL_SETS
from dpl_tools.errors import DplError
from dpl_tools.evaluation.coco_eval import coco_evaluation
from dpl_tools.evaluation.matching import box_iou_np, greedy_match, paired_iou

VIEWS = ("teacher", "cls", "reg")  # names in LABEL_SETS
VIEW_TITLES = {name: LABEL_SETS[name].title for name in VIEWS}
IOU_THRESHOLDS = (0.5, 0.75)
# Teacher-score bins of the box-quality breakdown: [0,.5), [.5,.6), ..., [.9,1].
SCORE_BIN_EDGES = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# COCO object sizes by the truth's area (px^2): small < 32^2 <= medium < 96^2 <= large.
SIZE_AREAS = {"small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, np.inf)}
PR_CURVE_POINTS = 200
# The keep rule is judged against the teacher's boxes from this score (polish's default
# initial threshold): what the kept set gains in precision and loses in recall.
KEEP_REFERENCE_SCORE = 0.5


@dataclass
class _View:
    """One view's predictions: boxes (N, 4) xyxy, labels, scores, image keys, row indices."""

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    images: np.ndarray
    rows: np.ndarray


def _column(table: pa.Table, name: str, dtype: Any, fill: Any) -> np.ndarray:
    return np.asarray(table[name].fill_null(fill).to_numpy(zero_copy_only=False), dtype=dtype)


def _boxes(table: pa.Table, prefix: str) -> np.ndarray:
    cols = [_column(table, f"{prefix}_{c}", np.float64, np.nan) for c in BOX_COORDS]
    return np.stack(cols, axis=1) if cols[0].size else np.zeros((0, 4))


def _ratio(num: float, den: float) -> float | None:
    return float(num) / den if den else None


def _pr_curve(scores: np.ndarray, tp: np.ndarray, n_gt: int) -> dict[str, list[float]]:
    """Precision/recall at every score cut (down-sampled to PR_CURVE_POINTS points)."""
    if len(scores) == 0 or n_gt == 0:
        return {"precision": [], "recall": [], "score": []}
    order = np.argsort(-scores, kind="stable")
    ctp = np.cumsum(tp[order])
    precision = ctp / np.arange(1, len(order) + 1)
    recall = ctp / n_gt
    keep = np.unique(np.linspace(0, len(order) - 1, min(len(order), PR_CURVE_POINTS)).astype(int))
    return {
        "precision": np.round(precision[keep], 4).tolist(),
        "recall": np.round(recall[keep], 4).tolist(),
        "score": np.round(scores[order][keep], 4).tolist(),
    }


def gt_image_keys(table: pa.Table, gt: CocoData) -> tuple[np.ndarray, int]:
    """Ground-truth image id of each row (-1 where none), and how many matched by id."""
    by_name = {im["file_name"]: im["id"] for im in gt.images}
    by_id = {im["id"] for im in gt.images}
    names = table["file_name"].to_pylist()
    ids = table["image_id"].to_pylist()
    keys = np.full(len(names), -1, dtype=np.int64)
    by_id_count: set = set()
    for i, (name, image_id) in enumerate(zip(names, ids, strict=True)):
        if name in by_name:
            keys[i] = by_name[name]
        elif image_id in by_id:
            keys[i] = image_id
            by_id_count.add(image_id)
    return keys, len(by_id_count)


def _gt_area(ann: dict[str, Any]) -> float:
    """A truth box's COCO area (its ``area`` field, else the bbox's width x height)."""
    return float(ann.get("area", ann["bbox"][2] * ann["bbox"][3]))


def _box_quality(before: np.ndarray, after: np.ndarray) -> dict[str, Any]:
    """Mean IoU to truth before/after polishing and the fraction improved (None: no box)."""
    some = len(before) > 0
    return {
        "boxes": int(len(before)),
        "mean_iou_before": float(before.mean()) if some else None,
        "mean_iou_after": float(after.mean()) if some else None,
        "improved_fraction": float((after > before).mean()) if some else None,
    }


def _bin_name(low: float, high: float, last: bool) -> str:
    return f"[{low:.1f},{high:.1f}{']' if last else ')'}"


def box_quality_by_score(
    before: np.ndarray, after: np.ndarray, scores: np.ndarray
) -> list[dict[str, Any]]:
    """``_box_quality`` per teacher-score bin of ``SCORE_BIN_EDGES`` (the last one closed),
    so a user sees at which confidence polishing helps."""
    out = []
    edges = SCORE_BIN_EDGES
    scores = np.asarray(scores, dtype=np.float32)  # compared as stored (float32), 0.9 is .9
    for i, (low, high) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        last = i == len(edges) - 2
        lo, hi = np.float32(low), np.float32(high)
        inside = (scores >= lo) & ((scores <= hi) if last else (scores < hi))
        quality = _box_quality(before[inside], after[inside])
        out.append({"bin": _bin_name(low, high, last), "low": low, "high": high, **quality})
    return out


def box_quality_by_size(
    before: np.ndarray, after: np.ndarray, areas: np.ndarray
) -> dict[str, dict[str, Any]]:
    """``_box_quality`` per COCO object size of the truth box (``SIZE_AREAS``)."""
    out = {}
    for name, (low, high) in SIZE_AREAS.items():
        inside = (areas >= low) & (areas < high)
        out[name] = _box_quality(before[inside], after[inside])
    return out


def _true_positives50(v: _View, truth: Any, mask: np.ndarray | None = None) -> int:
    """Class-aware greedy true positives at IoU 0.5 of a view (of its rows in ``mask``)."""
    keep = np.ones(len(v.rows), bool) if mask is None else mask
    tp = 0
    for k in np.unique(v.images[keep]):
        idx = np.flatnonzero(keep & (v.images == k))
        g_boxes, g_labels = truth(int(k))
        same = v.labels[idx][:, None] == g_labels[None, :]
        m, _ = greedy_match(box_iou_np(v.boxes[idx], g_boxes), v.scores[idx], 0.5, same)
        tp += int((m >= 0).sum())
    return tp


def keep_rule_quality(views: dict[str, _View], truth: Any, n_gt: int) -> dict[str, Any]:
    """The classification pseudo labels (``cls``: the use_cls rows) against the teacher's
    boxes with score >= ``KEEP_REFERENCE_SCORE``: precision / recall at IoU 0.5 (class-aware)
    of both, the recall the keep rule lost and the precision it gained."""
    teacher, kept = views["teacher"], views["cls"]
    ref = teacher.scores.astype(np.float32) >= np.float32(KEEP_REFERENCE_SCORE)
    tp_teacher, tp_kept = _true_positives50(teacher, truth, ref), _true_positives50(kept, truth)
    p_t, r_t = _ratio(tp_teacher, int(ref.sum())), _ratio(tp_teacher, n_gt)
    p_k, r_k = _ratio(tp_kept, len(kept.rows)), _ratio(tp_kept, n_gt)
    return {
        "reference_score": KEEP_REFERENCE_SCORE,
        "teacher_boxes": int(ref.sum()),
        "kept": int(len(kept.rows)),
        "teacher_precision50": p_t,
        "teacher_recall50": r_t,
        "kept_precision50": p_k,
        "kept_recall50": r_k,
        "recall_lost": None if r_t is None else r_t - r_k,
        "precision_gained": None if p_t is None or p_k is None else p_k - p_t,
    }


@dataclass
class Truth:
    """The ground truth of the evaluated images, by image id: xyxy boxes, classes, COCO
    areas, and the COCO subset that AP is computed on."""

    boxes: dict[int, np.ndarray]
    labels: dict[int, np.ndarray]
    areas: dict[int, np.ndarray]
    subset: dict[str, Any]
    count: int

    @classmethod
    def of(cls, gt: CocoData, eval_ids: set[int]) -> Truth:
        by_image: dict[int, list[dict]] = defaultdict(list)
        crowds: list[dict] = []  # for AP only: a box on a crowd region is no false positive
        for ann in gt.annotations:
            if ann["image_id"] in eval_ids:
                (crowds if ann.get("iscrowd", 0) else by_image[ann["image_id"]]).append(ann)

        def xyxy(anns: list[dict]) -> np.ndarray:
            boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
            return np.array(boxes, dtype=np.float64).reshape(-1, 4)

        subset = {
            "images": [im for im in gt.images if im["id"] in eval_ids],
            "annotations": [a for anns in by_image.values() for a in anns] + crowds,
            "categories": gt.categories,
        }
        return cls(
            boxes={k: xyxy(anns) for k, anns in by_image.items()},
            labels={k: np.array([a["category_id"] for a in anns]) for k, anns in by_image.items()},
            areas={k: np.array([_gt_area(a) for a in anns]) for k, anns in by_image.items()},
            subset=subset,
            count=sum(len(v) for v in by_image.values()),
        )

    def __call__(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes and classes of image ``k`` (empty when it has none)."""
        return self.boxes.get(k, np.zeros((0, 4))), self.labels.get(k, np.zeros(0, np.int64))


def view_quality(v: _View, truth: Truth) -> tuple[dict[str, Any], dict, np.ndarray]:
    """One view's precision and recall at each IoU threshold (class-aware), mean IoU of its
    matched boxes (class-agnostic), COCO AP; its PR curve; which boxes are TP at .5."""
    tp = {t: np.zeros(len(v.rows), dtype=bool) for t in IOU_THRESHOLDS}
    agnostic_iou = np.zeros(len(v.rows))
    groups: dict[int, list[int]] = defaultdict(list)
    for i, k in enumerate(v.images):
        groups[int(k)].append(i)
    for k, idx in groups.items():
        idx_arr = np.array(idx)
        g_boxes, g_labels = truth(k)
        iou = box_iou_np(v.boxes[idx_arr], g_boxes)
        same = v.labels[idx_arr][:, None] == g_labels[None, :]
        for t in IOU_THRESHOLDS:
            m, _ = greedy_match(iou, v.scores[idx_arr], t, same)
            tp[t][idx_arr] = m >= 0
        _, m_iou = greedy_match(iou, v.scores[idx_arr], 0.5)
        agnostic_iou[idx_arr] = m_iou
    matched = agnostic_iou >= 0.5
    stats: dict[str, Any] = {"boxes": int(len(v.rows))}
    for t in IOU_THRESHOLDS:
        suffix = f"{round(t * 100)}"
        stats[f"precision{suffix}"] = _ratio(tp[t].sum(), len(v.rows))
        stats[f"recall{suffix}"] = _ratio(tp[t].sum(), truth.count)
    stats["mean_iou"] = float(agnostic_iou[matched].mean()) if matched.any() else None
    stats["matched_boxes"] = int(matched.sum())
    detections = [
        {
            "image_id": int(k),
            "category_id": int(lab),
            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
            "score": float(s),
        }
        for b, lab, s, k in zip(v.boxes, v.labels, v.scores, v.images, strict=True)
    ]
    ap, class_ap = coco_evaluation(truth.subset, detections)
    stats.update({m: ap[m] for m in ("AP", "AP50", "AP75")})
    stats["per_class"] = class_quality(v, tp[0.5], truth, class_ap)
    return stats, _pr_curve(v.scores, tp[0.5], truth.count), tp[0.5]


def class_quality(
    v: _View, tp50: np.ndarray, truth: Truth, class_ap: dict[int, float]
) -> dict[str, dict[str, Any]]:
    """Per category (name): the view's boxes of that class, precision and recall at IoU
    0.5 (the same class-aware matches as the view's overall figures) and COCO AP."""
    gt_count: dict[int, int] = defaultdict(int)
    for labels in truth.labels.values():
        for label in labels:
            gt_count[int(label)] += 1
    out = {}
    for cat in truth.subset["categories"]:
        cid = int(cat["id"])
        mine = v.labels == cid
        hits = int(tp50[mine].sum())
        out[str(cat["name"])] = {
            "gt_boxes": gt_count[cid],
            "boxes": int(mine.sum()),
            "precision50": _ratio(hits, int(mine.sum())),
            "recall50": _ratio(hits, gt_count[cid]),
            "AP": class_ap.get(cid, -1.0),
        }
    return out


@dataclass
class _BoxChanges:
    """Per teacher box with a polished box: the IoU of each with the same truth box (the
    one overlapping the teacher box most, class-agnostic) and that truth's COCO area; per
    row, the class of the truth at IoU >= 0.5 (-1: none)."""

    before: np.ndarray
    after: np.ndarray
    truth_area: np.ndarray
    truth_label: np.ndarray
    rows: np.ndarray  # the rows ``before`` / ``after`` describe


def box_changes(
    teacher_boxes: np.ndarray,
    polished_boxes: np.ndarray,
    keys: np.ndarray,
    has_teacher: np.ndarray,
    has_polished: np.ndarray,
    truth: Truth,
) -> _BoxChanges:
    """How polishing moved each teacher box relative to its truth box (``_BoxChanges``)."""
    both = np.flatnonzero(has_teacher & has_polished)
    before, after = np.zeros(len(both)), np.zeros(len(both))
    truth_area = np.zeros(len(both))
    truth_label = np.full(len(teacher_boxes), -1, dtype=np.int64)
    rows_by_image: dict[int, list[int]] = defaultdict(list)
    for r in np.flatnonzero(has_teacher):
        rows_by_image[int(keys[r])].append(int(r))
    pos = {int(r): i for i, r in enumerate(both)}
    for k, rows in rows_by_image.items():
        g_boxes, g_labels = truth(k)
        if len(g_boxes) == 0:
            continue
        rows_arr = np.array(rows)
        iou_t = box_iou_np(teacher_boxes[rows_arr], g_boxes)
        best = iou_t.argmax(axis=1)
        best_iou = iou_t[np.arange(len(rows)), best]
        truth_label[rows_arr[best_iou >= 0.5]] = g_labels[best[best_iou >= 0.5]]
        with_polished = [i for i, r in enumerate(rows) if r in pos]
        if with_polished:
            sel = np.array(with_polished)
            target = g_boxes[best[sel]]
            at = np.array([pos[rows[i]] for i in with_polished])
            before[at] = best_iou[sel]
            after[at] = paired_iou(polished_boxes[rows_arr[sel]], target)
            truth_area[at] = truth.areas[k][best[sel]]
    return _BoxChanges(before, after, truth_area, truth_label, both)


def label_changes(
    has_teacher: np.ndarray,
    teacher_label: np.ndarray,
    polished_label: np.ndarray,
    truth_label: np.ndarray,
) -> dict[str, int]:
    """Labels the polisher changed: how many, how many to the truth's class (right), how
    many away from it (broke), how many on boxes matching no truth."""
    changed = has_teacher & (polished_label >= 0) & (polished_label != teacher_label)
    with_truth = changed & (truth_label >= 0)
    return {
        "changed": int(changed.sum()),
        "right": int((with_truth & (polished_label == truth_label)).sum()),
        "broke": int((with_truth & (teacher_label == truth_label)).sum()),
        "no_truth": int((changed & (truth_label < 0)).sum()),
    }


def pseudo_label_quality(table: pa.Table, gt: CocoData) -> dict[str, Any]:
    """Score the teacher, classification and regression views of pseudo labels against
    ground truth (see the module docstring); the result is JSON-ready. Unusable rows
    (``drop_unusable_rows``: a non-finite, inverted or empty box, or no label) are left out
    before scoring and counted in ``unusable_rows``."""
    table, unusable = drop_unusable_rows(table)
    status = table["status"].to_pylist()
    names = table["file_name"].to_pylist()
    ok = np.array([s == "ok" for s in status], dtype=bool)
    skipped_images = {n for n, s in zip(names, status, strict=True) if s != "ok"}
    keys, matched_by_id = gt_image_keys(table, gt)
    ok_images = {n for n, o in zip(names, ok, strict=True) if o}
    in_gt = ok & (keys >= 0)
    not_in_gt = {n for n, o, k in zip(names, ok, keys, strict=True) if o and k < 0}
    eval_ids = sorted({int(k) for k in keys[in_gt]})

    teacher_boxes = _boxes(table, "teacher")
    polished_boxes = _boxes(table, "polished")
    teacher_label = _column(table, "teacher_label", np.int64, -1)
    polished_label = _column(table, "polished_label", np.int64, -1)
    score = _column(table, "teacher_score", np.float64, 0.0)
    use_cls = _column(table, "use_cls", bool, False)
    use_reg = _column(table, "use_reg", bool, False)
    has_teacher = in_gt & ~np.isnan(teacher_boxes).any(axis=1)
    has_polished = in_gt & ~np.isnan(polished_boxes).any(axis=1)

    box_columns = {"teacher": teacher_boxes, "polished": polished_boxes}
    label_columns, flags = ({"teacher_label": teacher_label, "polished_label": polished_label},
                            {"use_cls": use_cls, "use_reg": use_reg})  # fmt: skip

    def view(name: str) -> _View:
        chosen = LABEL_SETS[name]
        boxes, labels = box_columns[chosen.boxes], label_columns[chosen.labels]
        mask = in_gt & ~np.isnan(boxes).any(axis=1) & (labels >= 0)
        if chosen.rows is not None:
            mask &= flags[chosen.rows]
        rows = np.flatnonzero(mask)
        return _View(boxes[rows], labels[rows], score[rows], keys[rows], rows)

    views = {name: view(name) for name in VIEWS}
    truth = Truth.of(gt, set(eval_ids))
    result_views: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    teacher_tp50 = np.zeros(len(table), dtype=bool)
    for name, v in views.items():
        result_views[name], curves[name], tp50 = view_quality(v, truth)
        if name == "teacher":
            teacher_tp50[v.rows] = tp50

    moved = box_changes(teacher_boxes, polished_boxes, keys, has_teacher, has_polished, truth)
    good = moved.before >= 0.5
    before, after, dropped = moved.before[good], moved.after[good], has_teacher & ~use_cls
    return {
        "images": {
            "ok": len(ok_images),
            "skipped": len(skipped_images - ok_images),
            "not_in_gt": len(not_in_gt),
            "evaluated": len(eval_ids),
            "matched_by_id": matched_by_id,
        },
        "gt_boxes": truth.count,
        "unusable_rows": unusable,
        "views": result_views,
        "label_changes": label_changes(has_teacher, teacher_label, polished_label,
                                       moved.truth_label),
        "cls_dropped": {
            "dropped": int(dropped.sum()),
            "true_positive": int((dropped & teacher_tp50).sum()),
            "false_positive": int((dropped & ~teacher_tp50).sum()),
        },
        "keep_rule": keep_rule_quality(views, truth, truth.count),
        "box_quality": _box_quality(before, after),
        "box_quality_by_score": box_quality_by_score(before, after, score[moved.rows][good]),
        "box_quality_by_size": box_quality_by_size(before, after, moved.truth_area[good]),
        "iou_to_truth": {
            "before": np.round(moved.before, 4).tolist(),
            "after": np.round(moved.after, 4).tolist(),
        },
        "pr_curves": curves,
    }  # fmt: skip


def scored_against_truth(
    table: pa.Table, meta: dict[str, Any], gt: CocoData, pseudo_path: str | Path
) -> dict[str, Any]:
    """``pseudo_label_quality`` of the pseudo labels read from ``pseudo_path`` (``table``
    and its metadata ``meta``), once the truth is known to fit them: the same categories
    (ids and names), and at least one image in common; else a one-line DplError (scored
    against another set's truth, every figure would be wrong or n/a without a word)."""
    from dpl_tools.data.student_data import check_pseudo_categories

    check_pseudo_categories(meta, (), gt, pseudo_path)
    figures = pseudo_label_quality(table, gt)
    if figures["images"]["ok"] and not figures["images"]["evaluated"]:
        raise DplError(
            f"{gt.path}: none of the {figures['images']['ok']} image(s) of {pseudo_path} is "
            "in this truth (matched by file name, then id): is it the truth of these images?"
        )
    return figures
