"""Build the static HTML report of a pseudo-label file (``dpl report``).

The report is built in a hidden temporary folder beside ``out`` and renamed onto it at
the end, so a reader sees the old report or the new one whole, never a half-written one.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dpl_tools.data.coco import load_coco
from dpl_tools.data.pseudo_labels import (
    META_POLISHER,
    META_TEACHER,
    META_THRESHOLDS,
    read_pseudo_labels,
)
from dpl_tools.errors import DplError
from dpl_tools.evaluation.pseudo_quality import pseudo_label_quality
from dpl_tools.report.gallery import gallery_items, write_thumbnail
from dpl_tools.report.html import gallery_html, index_html, page_name
from dpl_tools.report.plots import make_plots
from dpl_tools.report.summary import LabelSummary, category_names, summarize


@dataclass
class ReportResult:
    """Where the report went and what it shows."""

    index: Path
    summary: LabelSummary
    gallery_images: int
    pages: int
    unreadable: list[tuple[str, str]]


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DplError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "index.html").is_file():
        raise DplError(f"{out}: folder exists and is not a dpl report; choose another --out")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` onto ``out`` (an earlier report there is removed)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
) -> ReportResult:
    """Write ``out/index.html`` (summary, plots, quality with ``ann``) and gallery pages
    ``out/page-NNN.html`` of at most ``max_images`` thumbnails, ``page_size`` per page."""
    console = console or Console()
    images_dir, out = Path(images_dir), Path(out)
    if not images_dir.is_dir():
        raise DplError(f"{images_dir}: image folder not found")
    if page_size < 1 or max_images < 0 or thumb_size < 16:
        raise DplError("--page-size must be >= 1, --max-images >= 0, --thumb-size >= 16")
    _check_out(out)
    table, meta = read_pseudo_labels(labels)
    gt = load_coco(ann) if ann is not None else None
    names = category_names(meta, gt.categories if gt else None)
    summary = summarize(table)
    quality = pseudo_label_quality(table, gt) if gt is not None else None

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        plots = make_plots(table, tmp / "plots", quality)
        items = gallery_items(table, max_images)
        (tmp / "thumbs").mkdir()
        columns = (TextColumn("thumbnails"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, TimeRemainingColumn(), console=console, transient=True) as bar:
            for i, item in enumerate(bar.track(items), start=1):
                write_thumbnail(item, images_dir, tmp / "thumbs", i, names, thumb_size)
        unreadable = [(it.file_name, it.error) for it in items if it.error]
        pages = max(1, math.ceil(len(items) / page_size))
        for page in range(1, pages + 1):
            chunk = items[(page - 1) * page_size : page * page_size]
            html = gallery_html(chunk, page, pages, names, summary.labels)
            (tmp / page_name(page)).write_text(html, encoding="utf-8")
        bad = summary.skipped + unreadable
        html = index_html(
            str(labels), _meta_lines(meta), summary, names, plots, pages, len(items), bad, quality
        )
        (tmp / "index.html").write_text(html, encoding="utf-8")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ReportResult(out / "index.html", summary, len(items), pages, unreadable)
