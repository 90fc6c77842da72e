"""Find likely mistakes in the labeled set's own labels: missing boxes, wrong classes and
misplaced boxes, where the cross-fitted fold teachers (which never saw the image they
detected on) disagree confidently with a label.

Reads the out-of-fold detections of --noise-model crossfit (crossfit.parquet, beside the
noise file, or in the run directory) and the labeled COCO JSON; writes every issue, most
likely first, as Parquet (--out) and CSV (--csv), and prints the worst. Nothing is changed:
review the listed boxes, fix the labels (e.g. in Label Studio or CVAT), then train again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dpl_tools import api
from dpl_tools.cli.options import RunDir, within
from dpl_tools.run_dir import DEFAULT_RUN_DIR, resolve_input, resolve_output
from dpl_tools.settings import AT_LEAST_1, UNIT
from dpl_tools.tables import ReportTable


def command(
    ann: Annotated[
        Path | None,
        typer.Option("--ann", help="Labeled COCO JSON (default: <run-dir>/split/labeled.json)."),
    ] = None,
    crossfit: Annotated[
        Path | None,
        typer.Option(
            "--crossfit",
            help="Out-of-fold detections of the labeled images, from train-polisher / "
            "synth-noise --noise-model crossfit (default: <run-dir>/crossfit.parquet).",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Issues as Parquet (default: <run-dir>/audit.parquet)."),
    ] = None,
    csv: Annotated[Path | None, typer.Option("--csv", help="Also write the issues as CSV.")] = None,
    min_score: Annotated[
        float,
        typer.Option(
            "--min-score",
            help="Fold-teacher score from which a detection can flag a label (0..1).",
            callback=within(UNIT, float),
        ),
    ] = 0.5,
    top: Annotated[
        int,
        typer.Option("--top", help="Issues printed (>= 1).", callback=within(AT_LEAST_1)),
    ] = 10,
    run_dir: RunDir = DEFAULT_RUN_DIR,
) -> None:
    console = Console()
    result = api.audit(
        resolve_input(ann, run_dir, "labeled"), resolve_input(crossfit, run_dir, "crossfit"),
        resolve_output(out, run_dir, "audit"), csv=csv, min_score=min_score,
    )  # fmt: skip
    counts = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in result.counts.items())
    console.print(f"label audit: {counts}; written to {', '.join(map(str, result.written))}")
    table = ReportTable(title=f"the {top} most likely mistakes", title_justify="left")
    for name in ("issue", "score", "image", "label", "suggested", "IoU"):
        table.add_column(name, justify="left" if name in ("issue", "image") else "right")
    for row in result.issues.slice(0, top).to_pylist():
        iou = "" if row["iou"] is None else f"{row['iou']:.2f}"
        table.add_row(row["issue"], f"{row['score']:.2f}", row["file_name"],
                      row["category"] or "", row["suggested_category"] or "", iou)  # fmt: skip
    console.print(table)
