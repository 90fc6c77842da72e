"""Split a labeled COCO set by the SSOD protocol: P% labeled, rest unlabeled.

The labeled images are drawn reproducibly from --fold and --seed. Writes
labeled.json (images + boxes), unlabeled.json (images only) and
unlabeled_gt.json (the unlabeled images with their true boxes, to evaluate
pseudo labels later) into --out-dir (default: <run-dir>/split).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dpl_tools import api
from dpl_tools.cli.options import AllowOutsideRoot, RunDir, Seed, within
from dpl_tools.run_dir import DEFAULT_RUN_DIR, artifact
from dpl_tools.settings import AT_LEAST_1, NON_NEGATIVE, PERCENT
from dpl_tools.tables import ReportTable


def command(
    ann: Annotated[Path, typer.Argument(help="Labeled COCO JSON to split.")],
    percent: Annotated[
        float | None,
        typer.Option(
            "--percent",
            "-p",
            help="Percent of images kept labeled, in (0, 100] (default 10).",
            callback=within(PERCENT, float),
        ),
    ] = None,
    labeled_count: Annotated[
        int | None,
        typer.Option(
            "--labeled-count",
            help="Number of labeled images, >= 1 (instead of --percent).",
            callback=within(AT_LEAST_1),
        ),
    ] = None,
    fold: Annotated[
        int,
        typer.Option(
            "--fold",
            help="Fold number (>= 0): each fold draws a different subset.",
            callback=within(NON_NEGATIVE),
        ),
    ] = 1,
    seed: Seed = 0,
    images: Annotated[
        Path | None,
        typer.Option(
            "--images", help="Images folder: drop (and count) images whose file is missing."
        ),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out-dir", help="Output folder (default: <run-dir>/split)."),
    ] = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    allow_outside_root: AllowOutsideRoot = False,
) -> None:
    console = Console()
    out_dir = out_dir or artifact(run_dir, "labeled").parent
    written = api.split(
        ann, out_dir, percent=percent, labeled_count=labeled_count, fold=fold, seed=seed,
        images=images, allow_outside_root=allow_outside_root, console=console,
    )  # fmt: skip
    print_split(console, written)


def print_split(console: Console, written: api.SplitFiles) -> None:
    """The files of a split, with their images and boxes."""
    result, paths = written.split, written.files
    info = result.info
    title = f"split of {info['source']} (fold {info['fold']}, seed {info['seed']})"
    table = ReportTable(title=title, title_justify="left")
    for column in ("file", "images", "boxes"):
        table.add_column(column, justify="left" if column == "file" else "right")
    for name, path in paths.items():
        part = getattr(result, name)
        table.add_row(str(path), str(len(part["images"])), str(len(part["annotations"])))
    console.print(table)
