"""Train the regression and classification polishers with the teacher frozen.

One teacher backbone pass per image serves both polishers (RoI features of the 7 vote
boxes from the teacher's own RoI pooler). Regression: GIoU loss on --noise's regression
pairs; classification: cross-entropy on its classification pairs plus the teacher's RPN
proposals. An EMA copy (momentum 0.99) is saved, tied to the teacher's hash. A held-out
--val-fraction of the labeled images reports IoU before/after and classification recall.
AMP on GPU, DDP under torchrun.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from commands.options import Config, Device, LabeledAnn, RunDir, Seed
from dpl_tools.config import load_config
from dpl_tools.engine.train_polisher import train_polisher
from dpl_tools.run_dir import DEFAULT_RUN_DIR, resolve_input, resolve_output
from dpl_tools.runtime import cleanup_distributed


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def command(
    images: Annotated[
        Path, typer.Option("--images", help="Folder the file names in --ann are relative to.")
    ],
    teacher: Annotated[
        Path | None,
        typer.Option("--teacher", help="Teacher checkpoint (default <run-dir>/teacher.pt)."),
    ] = None,
    noise: Annotated[
        Path | None,
        typer.Option(
            "--noise", help="Pairs from dpl synth-noise (default <run-dir>/noise.parquet)."
        ),
    ] = None,
    ann: LabeledAnn = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Polisher checkpoint to write (default <run-dir>/polisher.pt)."),
    ] = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    config: Config = None,
    iters: Annotated[int | None, typer.Option("--iters", help="Training steps (400).")] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Images per step per process (2).")
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Base SGD learning rate (0.01).")] = None,
    reg_per_image: Annotated[
        int | None,
        typer.Option("--reg-per-image", help="Regression pairs sampled per image per step (256)."),
    ] = None,
    cls_per_image: Annotated[
        int | None,
        typer.Option(
            "--cls-per-image",
            help="Classification samples (pairs + RPN proposals) per image per step (512).",
        ),
    ] = None,
    max_proposals: Annotated[
        int | None,
        typer.Option("--max-proposals", help="Teacher RPN proposals added per image (1000)."),
    ] = None,
    ema_momentum: Annotated[
        float | None, typer.Option("--ema-momentum", help="EMA momentum of the saved copy (0.99).")
    ] = None,
    val_fraction: Annotated[
        float | None,
        typer.Option("--val-fraction", help="Labeled images held out for validation (0.1; 0 off)."),
    ] = None,
    val_json: Annotated[
        Path | None,
        typer.Option("--val-json", help="Also write the validation figures to this JSON file."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="DataLoader worker processes (2).")
    ] = None,
    device: Device = "auto",
    seed: Seed = 0,
) -> None:
    console = Console()
    cfg = load_config(
        config,
        {
            "polisher": {
                "iters": iters,
                "batch_size": batch_size,
                "lr": lr,
                "reg_per_image": reg_per_image,
                "cls_per_image": cls_per_image,
                "max_proposals": max_proposals,
                "ema_momentum": ema_momentum,
                "val_fraction": val_fraction,
                "workers": workers,
            }
        },
    )
    teacher_path = resolve_input(teacher, run_dir, "teacher")
    noise_path = resolve_input(noise, run_dir, "noise")
    ann_path = resolve_input(ann, run_dir, "labeled")
    out_path = resolve_output(out, run_dir, "polisher")
    try:
        _, result = train_polisher(
            teacher_path, noise_path, ann_path, images, out_path, cfg, device, seed,
            val_json, console,
        )  # fmt: skip
    finally:
        cleanup_distributed()
    if int(os.environ.get("RANK", 0)) != 0:
        return
    table = Table(title=f"polisher {out_path}", title_justify="left", show_header=False)
    table.add_row("iterations", f"{result.iterations} ({result.seconds:.1f} s)")
    table.add_row("images", f"{result.train_images} train, {result.val_images} held out")
    table.add_row(
        "last losses",
        f"reg (GIoU) {result.last_losses['reg']:.4f}, cls {result.last_losses['cls']:.4f}",
    )
    val = result.validation
    if val.get("reg_pairs"):
        table.add_row(
            "val mean IoU",
            f"{_fmt(val['mean_iou_before'])} -> {_fmt(val['mean_iou_after'])} "
            f"({val['reg_pairs']} pairs, {val['improved_fraction']:.0%} improved)",
        )
    if val.get("cls_samples"):
        table.add_row("val cls accuracy", _fmt(val["cls_accuracy"]))
        table.add_row("val fg / bg recall", f"{_fmt(val['fg_recall'])} / {_fmt(val['bg_recall'])}")
    console.print(table)
