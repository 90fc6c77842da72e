"""The console tables of pseudo-label quality (``dpl evaluate --pseudo``): the views'
precision, recall, IoU and AP side by side, and how polishing moved the boxes."""

from __future__ import annotations

from typing import Any

from dpl_tools.evaluation.pseudo_quality import SCORE_BIN_EDGES, VIEW_TITLES, VIEWS
from dpl_tools.tables import ReportTable

# The figures of a view shown by ``format_quality_table``, in order: (key, row label).
QUALITY_ROWS = (
    ("precision50", "P@.5"),
    ("recall50", "R@.5"),
    ("precision75", "P@.75"),
    ("recall75", "R@.75"),
    ("mean_iou", "mean IoU"),
    ("AP", "AP"),
    ("AP50", "AP50"),
    ("AP75", "AP75"),
)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or value < 0 else f"{value:.3f}"


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def format_quality_table(result: dict[str, Any]) -> ReportTable:
    """The result of ``pseudo_label_quality`` as a rich table, one column per view and one
    row per figure (so that it fits an 80-column terminal without cutting a cell)."""
    im = result["images"]
    table = ReportTable(
        title=f"Pseudo-label quality: {im['evaluated']} images, {result['gt_boxes']} truth boxes"
        f" ({im['skipped']} skipped, {im['not_in_gt']} not in ground truth)",
        title_justify="left",
    )
    table.add_column("figure", no_wrap=True)
    for name in VIEWS:
        table.add_column(VIEW_TITLES[name], justify="right", no_wrap=False)
    views = [result["views"][name] for name in VIEWS]
    table.add_row("boxes", *(str(v["boxes"]) for v in views))
    for key, label in QUALITY_ROWS:
        table.add_row(label, *(_fmt(v[key]) for v in views))
    lc, bq, dr = result["label_changes"], result["box_quality"], result["cls_dropped"]
    kr = result["keep_rule"]
    table.caption = (
        f"kept for classification: {kr['kept']} of {kr['teacher_boxes']} teacher boxes with "
        f"score >= {kr['reference_score']:g}; P@.5 {_fmt(kr['teacher_precision50'])} -> "
        f"{_fmt(kr['kept_precision50'])}, R@.5 {_fmt(kr['teacher_recall50'])} -> "
        f"{_fmt(kr['kept_recall50'])} (recall lost {_signed(kr['recall_lost'])})\n"
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


def _box_quality_row(table: ReportTable, name: str, q: dict[str, Any]) -> None:
    before, after = q["mean_iou_before"], q["mean_iou_after"]
    gain = None if before is None else after - before
    table.add_row(
        name,
        str(q["boxes"]),
        _fmt(before),
        _fmt(after),
        "n/a" if gain is None else f"{gain:+.3f}",
        _fmt(q["improved_fraction"]),
    )


def format_box_quality_table(result: dict[str, Any]) -> ReportTable:
    """Box IoU to truth before/after polishing per teacher-score bin and per COCO object
    size (truth area), the breakdowns of ``pseudo_label_quality``: where polishing helps."""
    table = ReportTable(
        title="Box IoU to truth before -> after polishing (teacher IoU >= 0.5)",
        title_justify="left",
    )
    table.add_column("boxes of", no_wrap=True)
    for name in ("boxes", "IoU before", "IoU after", "change", "improved"):
        table.add_column(name, justify="right")
    for q in result["box_quality_by_score"]:
        if q["low"] < SCORE_BIN_EDGES[1] and q["boxes"] == 0:
            continue  # below the usual initial threshold: shown only when present
        _box_quality_row(table, f"score {q['bin']}", q)
    table.add_section()
    limits = {"small": "area < 32^2", "medium": "32^2 to 96^2", "large": "area >= 96^2"}
    for name, q in result["box_quality_by_size"].items():
        _box_quality_row(table, f"{name} ({limits[name]})", q)
    _box_quality_row(table, "all", result["box_quality"])
    table.caption = "score: the teacher's; size: COCO area of the truth box (px^2)"
    table.caption_justify = "left"
    return table


def format_class_table(
    result: dict[str, Any], views: tuple[str, ...] = ("teacher", "cls")
) -> ReportTable:
    """Per class: the truth boxes, then precision and recall at IoU 0.5 and AP of each of
    ``views`` (the same matches as the overall table)."""
    table = ReportTable(title="Per class (P / R at IoU .5, AP)", title_justify="left")
    table.add_column("class")
    table.add_column("truth", justify="right")
    for name in views:
        table.add_column(f"{VIEW_TITLES[name]} P / R / AP", justify="right")
    first = result["views"][views[0]].get("per_class", {})
    for cls in first:
        cells = []
        for name in views:
            c = result["views"][name]["per_class"][cls]
            cells.append(f"{_fmt(c['precision50'])} / {_fmt(c['recall50'])} / {_fmt(c['AP'])}")
        table.add_row(cls, str(first[cls]["gt_boxes"]), *cells)
    return table
