"""Build the static HTML report of a pseudo-label file (``dpl report``).

The report folder is a dpl-owned folder (``dpl_tools.outputs.owned_folder``): the report is
built in a hidden staging folder and moved in at the end; files of an earlier report that
are not written again are removed, and nothing dpl did not write is ever touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

from dpl_tools.data.coco import check_inside_root, load_coco
from dpl_tools.data.pseudo_labels import (
    META_POLISHER,
    META_TEACHER,
    META_THRESHOLDS,
    drop_unusable_rows,
    dropped_warning,
    read_pseudo_labels,
)
from dpl_tools.errors import DplError
from dpl_tools.evaluation.keep_sweep import keep_rule_sweep
from dpl_tools.evaluation.pseudo_quality import scored_against_truth
from dpl_tools.outputs import check_owned_folder, owned_folder
from dpl_tools.progress import Progress
from dpl_tools.report.gallery import gallery_items, write_thumbnail
from dpl_tools.report.html import gallery_html, index_html, page_name
from dpl_tools.report.plots import make_plots
from dpl_tools.report.summary import LabelSummary, category_names, summarize
from dpl_tools.report.truth_marks import mark_rows


@dataclass
class ReportResult:
    """Where the report went and what it shows."""

    index: Path
    summary: LabelSummary
    gallery_images: int
    pages: int
    unreadable: list[tuple[str, str]]


REPORT_KIND = "report"  # marker kind of a report folder
REPORT_WHAT = "a dpl report"


def _meta_lines(meta: dict) -> list[str]:
    lines = []
    if meta.get(META_TEACHER):
        lines.append(f"teacher sha256: {str(meta[META_TEACHER])[:16]}")
    if meta.get(META_POLISHER):
        lines.append(f"polisher sha256: {str(meta[META_POLISHER])[:16]}")
    if meta.get(META_THRESHOLDS):
        lines.append(
            "thresholds: " + ", ".join(f"{k} {v}" for k, v in meta[META_THRESHOLDS].items())
        )
    return lines


def build_report(
    labels: str | Path,
    images_dir: str | Path,
    out: str | Path,
    ann: str | Path | None = None,
    max_images: int = 200,
    page_size: int = 50,
    thumb_size: int = 320,
    console: Console | None = None,
    allow_outside_root: bool = False,
) -> ReportResult:
    """Write ``out/index.html`` (summary, plots, quality with ``ann``) and gallery pages
    ``out/page-NNN.html`` of at most ``max_images`` thumbnails, ``page_size`` per page."""
    console = console or Console()
    images_dir, out = Path(images_dir), Path(out)
    if not images_dir.is_dir():
        raise DplError(f"{images_dir}: image folder not found")
    if page_size < 1 or max_images < 0 or thumb_size < 16:
        raise DplError("--page-size must be >= 1, --max-images >= 0, --thumb-size >= 16")
    check_owned_folder(out, REPORT_KIND, REPORT_WHAT)
    table, meta = read_pseudo_labels(labels)
    table, dropped = drop_unusable_rows(table)
    if dropped:
        warning = dropped_warning(labels, dropped)
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    read = [(None, name) for name in pc.unique(table["file_name"]).to_pylist()]
    check_inside_root(Path(labels), read, images_dir, allow_outside_root)
    gt = load_coco(ann) if ann is not None else None
    names = category_names(meta, gt.categories if gt else None)
    summary = summarize(table)
    quality = scored_against_truth(table, meta, gt, labels) if gt is not None else None
    thresholds = meta.get(META_THRESHOLDS) or {}
    sweep = None
    if gt is not None and {"cls_prob", "teacher_score"} <= set(thresholds):
        if table["polisher_prob"].null_count < table.num_rows:  # a polisher was used
            sweep = keep_rule_sweep(
                table, gt, float(thresholds["cls_prob"]), float(thresholds["teacher_score"])
            )

    with owned_folder(out, REPORT_KIND, "dpl report", REPORT_WHAT) as tmp:
        plots = make_plots(table, tmp / "plots", quality, sweep)
        items = gallery_items(table, max_images)
        if gt is not None:
            truth = gt.truth_by_file()
            for item in items:
                if item.file_name in truth:
                    item.truth = mark_rows(item.rows, *truth[item.file_name])
        (tmp / "thumbs").mkdir()
        columns = (TextColumn("thumbnails"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, TimeRemainingColumn(), console=console, transient=True) as bar:
            for i, item in enumerate(bar.track(items, description="thumbnails"), start=1):
                write_thumbnail(item, images_dir, tmp / "thumbs", i, names, thumb_size)
        unreadable = [(it.file_name, it.error) for it in items if it.error]
        pages = max(1, math.ceil(len(items) / page_size))
        for page in range(1, pages + 1):
            chunk = items[(page - 1) * page_size : page * page_size]
            html = gallery_html(chunk, page, pages, names, summary.labels)
            (tmp / page_name(page)).write_text(html, encoding="utf-8")
        bad = summary.skipped + unreadable
        html = index_html(
            str(labels), _meta_lines(meta), summary, names, plots, pages, len(items), bad,
            quality, sweep, thresholds,
        )  # fmt: skip
        (tmp / "index.html").write_text(html, encoding="utf-8")
    return ReportResult(out / "index.html", summary, len(items), pages, unreadable)
