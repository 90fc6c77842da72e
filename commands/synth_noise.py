"""Synthesize the polishers' training pairs (noisy boxes around labeled GT boxes).

Regression: 150 noisy copies per GT box at s = 0.2 plus the GT (target: the image's
best-IoU GT); classification: 50 at s = 0.06 and 50 at s = 0.2 plus the GT (label:
best-IoU GT's class if IoU >= 0.7, else background). --rounds independent draws, one
per training round. --noise-model empirical fits the noise to the teacher's own errors
(--teacher, on --heldout-ann images the teacher did not train on). Writes Parquet in row
groups and prints a summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from commands.options import Config, Device, LabeledAnn, RunDir, Seed
from dpl_tools.config import load_config
from dpl_tools.data.coco import load_coco
from dpl_tools.errors import DplError
from dpl_tools.noise import (
    GaussianNoise,
    GroundTruth,
    PairSettings,
    fit_empirical_noise,
    noise_metadata,
    synthesize_pairs,
    write_noise_parquet,
)
from dpl_tools.run_dir import DEFAULT_RUN_DIR, resolve_input, resolve_output
from dpl_tools.runtime import resolve_device

NOISE_MODELS = ("gaussian", "empirical")


def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DplError(f"{what} {text!r}: expected comma-separated numbers") from None


def command(
    ann: LabeledAnn = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Noise Parquet to write (default <run-dir>/noise.parquet)."),
    ] = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    config: Config = None,
    rounds: Annotated[
        int | None,
        typer.Option("--rounds", help="Independent noise draws, one per training round (4)."),
    ] = None,
    seed: Seed = 0,
    reg_copies: Annotated[
        int | None, typer.Option("--reg-copies", help="Regression copies per GT box (150).")
    ] = None,
    reg_scale: Annotated[
        float | None, typer.Option("--reg-scale", help="Regression noise scale s (0.2).")
    ] = None,
    cls_copies: Annotated[
        str | None,
        typer.Option("--cls-copies", help="Classification copies per group, e.g. 50,50."),
    ] = None,
    cls_scales: Annotated[
        str | None,
        typer.Option("--cls-scales", help="Classification noise scale per group, e.g. 0.06,0.2."),
    ] = None,
    fg_iou: Annotated[
        float | None,
        typer.Option("--fg-iou", help="Classification: IoU with the best GT for its label (0.7)."),
    ] = None,
    noise_model: Annotated[
        str | None,
        typer.Option("--noise-model", help="gaussian (the paper's) or empirical (teacher errors)."),
    ] = None,
    teacher: Annotated[
        Path | None,
        typer.Option(
            "--teacher", help="Teacher for --noise-model empirical (<run-dir>/teacher.pt)."
        ),
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option("--images", help="Image folder of --heldout-ann (empirical noise)."),
    ] = None,
    heldout_ann: Annotated[
        Path | None,
        typer.Option(
            "--heldout-ann",
            help="COCO JSON of labeled images the teacher did not train on, to fit empirical "
            "noise on (default: --ann itself, which understates real errors).",
        ),
    ] = None,
    empirical_inflate: Annotated[
        float | None,
        typer.Option(
            "--empirical-inflate", help="Scale factor on the fitted teacher errors (1.0)."
        ),
    ] = None,
    device: Device = "auto",
    workers: Annotated[
        int, typer.Option("--workers", help="DataLoader workers for the teacher (empirical).")
    ] = 2,
) -> None:
    console = Console()
    cfg = load_config(
        config,
        {
            "polisher": {
                "rounds": rounds,
                "reg_copies": reg_copies,
                "reg_scale": reg_scale,
                "cls_copies": [int(v) for v in _floats(cls_copies, "--cls-copies") or []] or None,
                "cls_scales": _floats(cls_scales, "--cls-scales"),
                "fg_iou": fg_iou,
                "noise_model": noise_model,
                "empirical_inflate": empirical_inflate,
            }
        },
    )["polisher"]
    if cfg["noise_model"] not in NOISE_MODELS:
        raise DplError(
            f"--noise-model {cfg['noise_model']!r}: choose from {', '.join(NOISE_MODELS)}"
        )
    if int(cfg["rounds"]) < 1:
        raise DplError("--rounds must be at least 1")
    settings = PairSettings(
        int(cfg["reg_copies"]), float(cfg["reg_scale"]), [int(c) for c in cfg["cls_copies"]],
        [float(s) for s in cfg["cls_scales"]], float(cfg["fg_iou"]),
    )  # fmt: skip
    settings.groups("cls")  # validates copies vs scales
    ann_path = resolve_input(ann, run_dir, "labeled")
    coco = load_coco(ann_path)
    for line in coco.report.lines():
        console.print(f"[yellow]warning:[/] {line}", highlight=False)
    gt = GroundTruth.from_coco(coco)
    if len(gt.boxes) == 0:
        raise DplError(f"{ann_path}: no boxes to synthesize pairs from")

    model = GaussianNoise()
    if cfg["noise_model"] == "empirical":
        from dpl_tools.models.checkpoint import load_detector

        if images is None:
            raise DplError("--noise-model empirical needs --images (the folder of the fit images)")
        teacher_path = resolve_input(teacher, run_dir, "teacher")
        if heldout_ann is None:
            console.print(
                "[yellow]warning:[/] no --heldout-ann: fitting the noise on the teacher's own "
                "training images, whose errors understate its real errors"
            )
        fit_coco = load_coco(heldout_ann or ann_path, images)
        dev = resolve_device(device)
        detector, _ = load_detector(teacher_path, dev)
        with Progress(TextColumn("fit noise"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:  # fmt: skip
            task = progress.add_task("fit", total=len(fit_coco.images))
            model = fit_empirical_noise(
                detector, fit_coco, images, dev, workers=workers,
                min_match_iou=float(cfg["empirical_min_match_iou"]),
                reg_min_score=float(cfg["empirical_reg_min_score"]),
                cls_min_score=float(cfg["empirical_cls_min_score"]),
                inflate=float(cfg["empirical_inflate"]),
                progress=lambda: progress.advance(task),
            )  # fmt: skip
        fitted = model.describe()
        std = ", ".join(f"{v:.3f}" for v in fitted["relative_std_confident"])
        console.print(
            f"empirical noise: {fitted['matched_detections']} matched detections "
            f"({fitted['confident_detections']} with score >= {model.reg_min_score}); "
            f"relative std (x1, y1, x2, y2) = {std}",
            highlight=False,
        )

    out_path = resolve_output(out, run_dir, "noise")
    meta = noise_metadata(coco, model, settings, int(cfg["rounds"]), seed)
    copies = settings.rows_per_box()
    with Progress(TextColumn("synth-noise"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:  # fmt: skip
        task = progress.add_task("pairs", total=int(cfg["rounds"]) * len(gt.boxes) * copies)
        summary = write_noise_parquet(
            out_path,
            synthesize_pairs(gt, model, settings, int(cfg["rounds"]), seed),
            meta,
            on_chunk=lambda t: progress.advance(task, t.num_rows),
        )
    table = Table(title=f"synth-noise -> {out_path}", title_justify="left")
    for name in ("kind", "pairs", "mean IoU", "foreground"):
        table.add_column(name, justify="right")
    first = next(iter(summary.per_kind.values()), {})
    for bin_name in first.get("iou_histogram", {}):
        table.add_column(f"IoU {bin_name}", justify="right")
    for kind, stats in summary.per_kind.items():
        fg = stats["foreground_fraction"]
        table.add_row(
            kind, str(stats["pairs"]), f"{stats['mean_iou']:.3f}",
            "" if fg is None else f"{fg:.1%}",
            *(f"{v / max(stats['pairs'], 1):.1%}" for v in stats["iou_histogram"].values()),
        )  # fmt: skip
    console.print(table)
    console.print(
        f"{len(gt.image_ids)} images, {len(gt.boxes)} GT boxes, {cfg['rounds']} round(s), "
        f"noise model {model.name}",
        highlight=False,
    )
