"""Quality of pseudo labels against ground truth: the teacher view vs the polished views.

Three views of one pseudo-label table are scored side by side:

- ``teacher``: every row with a box (teacher box, teacher label, teacher score);
- ``cls``: the classification pseudo labels, rows with ``use_cls`` (teacher box,
  polished label);
- ``reg``: the regression pseudo labels, rows with ``use_reg`` (polished box, teacher
  label).

Every view is ranked by the teacher score. Precision and recall at IoU 0.5 / 0.75 use
COCO's greedy matching: predictions in descending score order, each takes the unmatched
ground-truth box *of its class* with the highest IoU (at least the threshold), one truth
per prediction. The box-quality figure ``mean_iou`` uses the same greedy matching but
*class-agnostic* at IoU >= 0.5, so that label errors do not hide box errors. AP comes
from pycocotools on the same images. Only rows with ``status == "ok"`` count; images are
matched to the ground truth by file name, else by image id; crowd annotations are ignored.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from rich.table import Table
from torchvision.ops import box_iou

from dpl_tools.data.coco import CocoData
from dpl_tools.evaluation.coco_eval import coco_metrics

VIEWS = ("teacher", "cls", "reg")
VIEW_TITLES = {
    "teacher": "teacher boxes",
    "cls": "classification pseudo labels",
    "reg": "regression pseudo labels",
}
IOU_THRESHOLDS = (0.5, 0.75)
PR_CURVE_POINTS = 200


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
    cols = [_column(table, f"{prefix}_{c}", np.float64, np.nan) for c in ("x1", "y1", "x2", "y2")]
    return np.stack(cols, axis=1) if cols[0].size else np.zeros((0, 4))


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of xyxy boxes (torchvision.ops.box_iou)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    return box_iou(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b)).numpy()


def paired_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of a[i] with b[i] for two (N, 4) xyxy arrays."""
    ix = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = ix * iy
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a + area_b - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def greedy_match(
    iou: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    same_class: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """COCO-style greedy matching of predictions (rows of ``iou``) to truths (columns).

    Predictions go in descending score order; each takes the still unmatched truth with
    the highest IoU >= ``threshold`` (restricted to ``same_class`` pairs when given).
    Returns (matched truth index or -1, IoU of the match or 0) per prediction.
    """
    n_pred, n_gt = iou.shape
    match = np.full(n_pred, -1, dtype=np.int64)
    match_iou = np.zeros(n_pred)
    if n_pred == 0 or n_gt == 0:
        return match, match_iou
    candidates = np.where(same_class, iou, -1.0) if same_class is not None else iou.copy()
    taken = np.zeros(n_gt, dtype=bool)
    for p in np.argsort(-scores, kind="stable"):
        row = np.where(taken, -1.0, candidates[p])
        g = int(np.argmax(row))
        if row[g] >= threshold:
            match[p], match_iou[p] = g, row[g]
            taken[g] = True
    return match, match_iou


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


def _gt_image_keys(table: pa.Table, gt: CocoData) -> tuple[np.ndarray, int]:
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


def pseudo_label_quality(table: pa.Table, gt: CocoData) -> dict[str, Any]:
    """Score the teacher, classification and regression views of pseudo labels against
    ground truth (see the module docstring); the result is JSON-ready."""
    status = table["status"].to_pylist()
    names = table["file_name"].to_pylist()
    ok = np.array([s == "ok" for s in status], dtype=bool)
    skipped_images = {n for n, s in zip(names, status, strict=True) if s != "ok"}
    keys, matched_by_id = _gt_image_keys(table, gt)
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

    def view(mask: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> _View:
        rows = np.flatnonzero(mask)
        return _View(boxes[rows], labels[rows], score[rows], keys[rows], rows)

    views = {
        "teacher": view(has_teacher, teacher_boxes, teacher_label),
        "cls": view(has_teacher & use_cls & (polished_label >= 0), teacher_boxes, polished_label),
        "reg": view(has_polished & use_reg, polished_boxes, teacher_label),
    }

    eval_set = set(eval_ids)
    gt_by_image: dict[int, list[dict]] = defaultdict(list)
    for ann in gt.annotations:
        if ann["image_id"] in eval_set and not ann.get("iscrowd", 0):
            gt_by_image[ann["image_id"]].append(ann)
    gt_boxes = {
        k: np.array(
            [
                [
                    a["bbox"][0],
                    a["bbox"][1],
                    a["bbox"][0] + a["bbox"][2],
                    a["bbox"][1] + a["bbox"][3],
                ]
                for a in anns
            ]
        ).reshape(-1, 4)
        for k, anns in gt_by_image.items()
    }
    gt_labels = {k: np.array([a["category_id"] for a in anns]) for k, anns in gt_by_image.items()}
    n_gt = sum(len(v) for v in gt_by_image.values())
    empty_boxes, empty_labels = np.zeros((0, 4)), np.zeros(0, dtype=np.int64)

    def truth(k: int) -> tuple[np.ndarray, np.ndarray]:
        return gt_boxes.get(k, empty_boxes), gt_labels.get(k, empty_labels)

    gt_subset = {
        "images": [im for im in gt.images if im["id"] in eval_set],
        "annotations": [a for anns in gt_by_image.values() for a in anns],
        "categories": gt.categories,
    }

    result_views: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    teacher_tp50 = np.zeros(len(table), dtype=bool)
    for name, v in views.items():
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
        if name == "teacher":
            teacher_tp50[v.rows] = tp[0.5]
        matched = agnostic_iou >= 0.5
        stats: dict[str, Any] = {"boxes": int(len(v.rows))}
        for t in IOU_THRESHOLDS:
            suffix = f"{round(t * 100)}"
            stats[f"precision{suffix}"] = _ratio(tp[t].sum(), len(v.rows))
            stats[f"recall{suffix}"] = _ratio(tp[t].sum(), n_gt)
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
        ap = coco_metrics(gt_subset, detections)
        stats.update({m: ap[m] for m in ("AP", "AP50", "AP75")})
        result_views[name] = stats
        curves[name] = _pr_curve(v.scores, tp[0.5], n_gt)

    # Per box: IoU of the teacher box and of the polished box with the same truth box
    # (the one that overlaps the teacher box most, class-agnostic), and label checks.
    both = np.flatnonzero(has_teacher & has_polished)
    before, after = np.zeros(len(both)), np.zeros(len(both))
    truth_label = np.full(len(table), -1, dtype=np.int64)  # class of the truth at IoU >= 0.5
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
    good = before >= 0.5
    box_quality = {
        "boxes": int(good.sum()),
        "mean_iou_before": float(before[good].mean()) if good.any() else None,
        "mean_iou_after": float(after[good].mean()) if good.any() else None,
        "improved_fraction": float((after[good] > before[good]).mean()) if good.any() else None,
    }

    changed = has_teacher & (polished_label >= 0) & (polished_label != teacher_label)
    with_truth = changed & (truth_label >= 0)
    label_changes = {
        "changed": int(changed.sum()),
        "right": int((with_truth & (polished_label == truth_label)).sum()),
        "broke": int((with_truth & (teacher_label == truth_label)).sum()),
        "no_truth": int((changed & (truth_label < 0)).sum()),
    }
    dropped = has_teacher & ~use_cls
    cls_dropped = {
        "dropped": int(dropped.sum()),
        "true_positive": int((dropped & teacher_tp50).sum()),
        "false_positive": int((dropped & ~teacher_tp50).sum()),
    }
    return {
        "images": {
            "ok": len(ok_images),
            "skipped": len(skipped_images - ok_images),
            "not_in_gt": len(not_in_gt),
            "evaluated": len(eval_ids),
            "matched_by_id": matched_by_id,
        },
        "gt_boxes": n_gt,
        "views": result_views,
        "label_changes": label_changes,
        "cls_dropped": cls_dropped,
        "box_quality": box_quality,
        "iou_to_truth": {
            "before": np.round(before, 4).tolist(),
            "after": np.round(after, 4).tolist(),
        },
        "pr_curves": curves,
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or value < 0 else f"{value:.3f}"


def format_quality_table(result: dict[str, Any]) -> Table:
    """The result of ``pseudo_label_quality`` as a rich table, one row per view."""
    im = result["images"]
    table = Table(
        title=f"Pseudo-label quality: {im['evaluated']} images, {result['gt_boxes']} truth boxes"
        f" ({im['skipped']} skipped, {im['not_in_gt']} not in ground truth)",
        title_justify="left",
    )
    columns = ("boxes", "P@.5", "R@.5", "P@.75", "R@.75", "mean IoU", "AP", "AP50", "AP75")
    table.add_column("view")
    for c in columns:
        table.add_column(c, justify="right")
    for name in VIEWS:
        v = result["views"][name]
        table.add_row(
            VIEW_TITLES[name],
            str(v["boxes"]),
            *(_fmt(v[k]) for k in ("precision50", "recall50", "precision75", "recall75")),
            _fmt(v["mean_iou"]),
            *(_fmt(v[k]) for k in ("AP", "AP50", "AP75")),
        )
    lc, bq, dr = result["label_changes"], result["box_quality"], result["cls_dropped"]
    table.caption = (
        f"labels changed by the polisher: {lc['changed']} ({lc['right']} right, "
        f"{lc['broke']} broke a right label, {lc['no_truth']} without truth at IoU 0.5)\n"
        f"dropped from classification: {dr['dropped']} ({dr['false_positive']} false "
        f"positives, {dr['true_positive']} true positives at IoU 0.5)\n"
        f"box IoU to truth, {bq['boxes']} boxes with teacher IoU >= 0.5: "
        f"{_fmt(bq['mean_iou_before'])} -> {_fmt(bq['mean_iou_after'])}, "
        f"{_fmt(bq['improved_fraction'])} improved\n"
        "mean IoU: class-agnostic greedy match at IoU >= 0.5; P/R: class-aware (COCO)"
    )
    table.caption_justify = "left"
    return table
