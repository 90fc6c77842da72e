"""Write a self-contained static HTML report of a pseudo-label file (open <out>/index.html).

Summary counts, score / probability / box-shift histograms, with --ann the quality against
ground truth, and a paged gallery of thumbnails (largest corrections first, filterable by
class). --max-images bounds the gallery so a huge run still reports quickly.

Given an online student checkpoint (dpl train-student --online, a .pt file) instead: its
in-loop pseudo-label log as a table and plots over the iterations (no --images needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dpl_tools import api
from dpl_tools.cli.options import AllowOutsideRoot, within
from dpl_tools.errors import DplError
from dpl_tools.settings import AT_LEAST_1, NON_NEGATIVE, Range
from dpl_tools.tables import ReportTable


def command(
    labels: Annotated[
        Path,
        typer.Argument(
            help="Pseudo-label Parquet file (or part-file folder) of dpl polish, or an online "
            "student checkpoint (.pt) of dpl train-student --online."
        ),
    ],
    images: Annotated[
        Path | None,
        typer.Option(
            "--images",
            help="Folder the file names in the labels are relative to (required for labels).",
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Report folder to write (replaced if it holds a report).")
    ] = Path("report"),
    ann: Annotated[
        Path | None,
        typer.Option("--ann", help="Ground-truth COCO JSON: adds pseudo-label quality plots."),
    ] = None,
    max_images: Annotated[
        int,
        typer.Option(
            "--max-images",
            help="Images in the gallery (largest corrections first; >= 0).",
            callback=within(NON_NEGATIVE),
        ),
    ] = 200,
    page_size: Annotated[
        int,
        typer.Option(
            "--page-size", help="Thumbnails per gallery page (>= 1).", callback=within(AT_LEAST_1)
        ),
    ] = 50,
    thumb_size: Annotated[
        int,
        typer.Option(
            "--thumb-size",
            help="Long side of a thumbnail in pixels (>= 16).",
            callback=within(Range(16)),
        ),
    ] = 320,
    allow_outside_root: AllowOutsideRoot = False,
) -> None:
    console = Console()
    if labels.suffix == ".pt":  # an online student: its in-loop log
        if images is not None or ann is not None:
            raise DplError(f"{labels}: --images and --ann are for a pseudo-label file")
        console.print(f"report written to {api.online_report(labels, out)}")
        return
    if images is None:
        raise DplError(f"{labels}: --images is required for a pseudo-label file")
    result = api.report(
        labels, images, out, ann=ann, max_images=max_images, page_size=page_size,
        thumb_size=thumb_size, allow_outside_root=allow_outside_root, console=console,
    )  # fmt: skip
    s = result.summary
    table = ReportTable(title=f"Report of {labels}", title_justify="left")
    for col in ("images", "skipped", "boxes", "changed", "kept cls", "kept reg", "gallery"):
        table.add_column(col, justify="right")
    table.add_row(
        str(s.images_ok), str(s.images_skipped), str(s.teacher_boxes), str(s.labels_changed),
        str(s.kept_cls), str(s.kept_reg), f"{result.gallery_images} in {result.pages} pages",
    )  # fmt: skip
    console.print(table)
    if result.unreadable:
        console.print(f"[yellow]{len(result.unreadable)} unreadable image(s) listed in the report")
    console.print(f"report written to {result.index}")
