"""Evaluate a detector checkpoint against COCO ground truth (AP, AP50, AP75, APs/m/l).

Detections use COCO practice (score >= 0.001, at most 100 per image). --json saves
the metrics, --predictions the COCO results JSON (COCO category ids). With --pseudo,
scores a dpl polish output instead: teacher view vs polished view against --ann, and
box IoU before/after polishing per teacher-score bin and per object size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dpl_tools import api
from dpl_tools.cli.options import AllowOutsideRoot, Device, RunDir, within
from dpl_tools.data.pseudo_labels import dropped_warning
from dpl_tools.errors import DplError
from dpl_tools.evaluation.coco_eval import METRICS
from dpl_tools.evaluation.quality_tables import (
    format_box_quality_table,
    format_class_table,
    format_quality_table,
)
from dpl_tools.outputs import check_distinct_outputs
from dpl_tools.run_dir import DEFAULT_RUN_DIR, artifact, resolve_input
from dpl_tools.settings import AT_LEAST_1, NON_NEGATIVE, UNIT
from dpl_tools.tables import ReportTable

BatchSize = Annotated[
    int,
    typer.Option(
        "--batch-size", help="Images per inference batch (>= 1).", callback=within(AT_LEAST_1)
    ),
]
Workers = Annotated[
    int,
    typer.Option(
        "--workers", help="DataLoader workers decoding images.", callback=within(NON_NEGATIVE)
    ),
]
ScoreThresh = Annotated[
    float,
    typer.Option(
        "--score-thresh",
        help="Keep detections with at least this score (in [0, 1]).",
        callback=within(UNIT, float),
    ),
]
MaxDets = Annotated[
    int,
    typer.Option(
        "--max-dets", help="Detections kept per image (>= 1).", callback=within(AT_LEAST_1)
    ),
]


def print_metrics(console: Console, metrics: dict[str, float], title: str) -> None:
    """The COCO metrics as a one-row table (n/a where the ground truth has no such box)."""
    table = ReportTable(title=title, title_justify="left")
    for name in METRICS:
        table.add_column(name, justify="right")
    table.add_row(*("n/a" if metrics[n] < 0 else f"{metrics[n]:.3f}" for n in METRICS))
    console.print(table)


def print_pseudo_quality(console: Console, quality: api.PseudoQuality) -> None:
    """The tables of ``api.evaluate_pseudo``: teacher vs polished view, the keep rule,
    box IoU before/after polishing, per class."""
    result = quality.figures
    if result["unusable_rows"]:
        warning = dropped_warning(quality.labels, result["unusable_rows"])
        console.print(f"[yellow]warning:[/] {warning}; not scored", highlight=False, soft_wrap=True)
    console.print(format_quality_table(result))
    if result["thresholds"] and "cls_prob" in result["thresholds"]:
        t = result["thresholds"]
        console.print(
            f"keep rule {t.get('keep_rule', 'n/a')}: cls_prob {t['cls_prob']:g} "
            f"({t.get('cls_prob_source', 'n/a')}), teacher_score {t['teacher_score']:g} "
            f"({t.get('teacher_score_source', 'n/a')})",
            highlight=False,
        )
    console.print(format_box_quality_table(result))
    console.print(format_class_table(result))
    for path in quality.written:
        console.print(f"figures written to {path}")


def print_evaluation(console: Console, result: api.Evaluation) -> None:
    """The metrics table and speed of ``api.evaluate``, and the files it wrote."""
    title = f"{result.checkpoint} on {result.ann} ({result.summary['images']} images)"
    print_metrics(console, result.metrics, title)
    speed = result.summary
    console.print(f"inference: {speed['inference_s']:.1f} s, {speed['images_per_s']:.2f} images/s")
    for path in result.written:
        what = "metrics" if path == result.json_out else f"{len(result.detections)} detections"
        console.print(f"{what} written to {path}")


def command(
    ann: Annotated[Path, typer.Option("--ann", help="Ground-truth COCO JSON.")],
    pseudo: Annotated[
        Path | None,
        typer.Option(
            "--pseudo",
            help="Instead of a model: pseudo labels from dpl polish (file or part directory), "
            "scored against --ann, teacher view vs polished view.",
        ),
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option("--images", help="Folder the file names in --ann are relative to."),
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Detector checkpoint (default: <run-dir>/teacher.pt)."),
    ] = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    batch_size: BatchSize = 4,
    workers: Workers = 2,
    device: Device = "auto",
    score_thresh: ScoreThresh = 0.001,
    max_dets: MaxDets = 100,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Save the metrics as JSON here.")
    ] = None,
    predictions: Annotated[
        Path | None,
        typer.Option("--predictions", help="Save the detections as COCO results JSON here."),
    ] = None,
    allow_outside_root: AllowOutsideRoot = False,
) -> None:
    console = Console()
    if pseudo is not None:
        model_only = {"--model": model, "--images": images, "--predictions": predictions}
        unused = [name for name, value in model_only.items() if value is not None]
        if unused:
            raise DplError(f"{', '.join(unused)}: for evaluating a model, not with --pseudo")
    model_in = None if pseudo is not None else model or artifact(run_dir, "teacher")
    check_distinct_outputs(
        {"--ann": ann, "--pseudo": pseudo, "--images": images, "--model": model_in},
        {"--json": json_out, "--predictions": predictions},
    )
    if pseudo is not None:
        print_pseudo_quality(console, api.evaluate_pseudo(pseudo, ann, json_out=json_out))
        return
    if images is None:
        raise DplError("evaluating a model needs --images (the folder of the --ann images)")
    model_path = resolve_input(model, run_dir, "teacher", "--model", what="model checkpoint")
    result = api.evaluate(
        model_path, ann, images, batch_size=batch_size, workers=workers, device=device,
        score_thresh=score_thresh, max_dets=max_dets, json_out=json_out,
        predictions=predictions, allow_outside_root=allow_outside_root, console=console,
    )  # fmt: skip
    print_evaluation(console, result)
