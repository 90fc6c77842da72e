"""Train the student detector on labeled ground truth plus polished pseudo labels.

Each iteration: --batch-size labeled images and on average --unlabeled-ratio
pseudo-labeled images per labeled one; loss = L_labeled + --unlabeled-weight *
L_unlabeled. Disentangled supervision (the paper): RPN and RoI classification learn
from the classification pseudo labels, RoI box regression from the polished boxes.
Ablations: --pseudo-view raw, --no-disentangle. Starts from the teacher (--init).
AMP on GPU, DDP under torchrun, periodic checkpoints, --resume as for the teacher.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from commands.options import (
    CheckpointEvery,
    Config,
    Device,
    Iters,
    LabeledAnn,
    Lr,
    Resume,
    RunDir,
    Seed,
    Workers,
)
from dpl_tools.config import load_config
from dpl_tools.engine.train_student import train_student
from dpl_tools.run_dir import DEFAULT_RUN_DIR, resolve_input, resolve_output
from dpl_tools.runtime import cleanup_distributed


def command(
    images: Annotated[
        Path,
        typer.Option("--images", help="Folder the file names in --ann are relative to."),
    ],
    ann: LabeledAnn = None,
    pseudo: Annotated[
        Path | None,
        typer.Option(
            "--pseudo", help="Pseudo labels from dpl polish (default: <run-dir>/labels.parquet)."
        ),
    ] = None,
    unlabeled_images: Annotated[
        Path | None,
        typer.Option(
            "--unlabeled-images",
            help="Folder the pseudo-labeled file names are relative to (default: --images).",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Checkpoint to write (default: <run-dir>/student.pt)."),
    ] = None,
    init: Annotated[
        str,
        typer.Option(
            "--init",
            help="Initial weights: teacher (<run-dir>/teacher.pt), a detector checkpoint "
            "path, or imagenet (fresh model with the config's backbone weights).",
        ),
    ] = "teacher",
    run_dir: RunDir = DEFAULT_RUN_DIR,
    config: Config = None,
    pseudo_view: Annotated[
        str | None,
        typer.Option(
            "--pseudo-view",
            help="polished (default) or raw (teacher boxes and labels, unpolished).",
        ),
    ] = None,
    disentangle: Annotated[
        bool | None,
        typer.Option(
            "--disentangle/--no-disentangle",
            help="Disentangled supervision (default) or polished boxes+labels for every loss.",
        ),
    ] = None,
    unlabeled_ratio: Annotated[
        float | None,
        typer.Option(
            "--unlabeled-ratio",
            help="Pseudo-labeled images per labeled image in a batch (default 1.0).",
        ),
    ] = None,
    unlabeled_weight: Annotated[
        float | None,
        typer.Option(
            "--unlabeled-weight", help="Weight of the pseudo-labeled images' loss (default 1.0)."
        ),
    ] = None,
    iters: Iters = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", help="Labeled images per iteration per process."),
    ] = None,
    lr: Lr = None,
    workers: Workers = None,
    device: Device = "auto",
    seed: Seed = 0,
    resume: Resume = False,
    checkpoint_every: CheckpointEvery = None,
) -> None:
    console = Console()
    cfg = load_config(
        config,
        {
            "student": {
                "iters": iters,
                "batch_size": batch_size,
                "lr": lr,
                "workers": workers,
                "checkpoint_every": checkpoint_every,
                "pseudo_view": pseudo_view,
                "disentangle": disentangle,
                "unlabeled_ratio": unlabeled_ratio,
                "unlabeled_weight": unlabeled_weight,
            },
        },
    )
    ann = resolve_input(ann, run_dir, "labeled")
    pseudo = resolve_input(pseudo, run_dir, "labels")
    out = resolve_output(out, run_dir, "student")
    init_from = init if init == "imagenet" else resolve_input(
        None if init == "teacher" else init, run_dir, "teacher", "--init"
    )  # fmt: skip
    try:
        _, spec, result, data = train_student(
            ann, images, pseudo, out, cfg, init_from, unlabeled_images, device, seed, resume,
            console,
        )  # fmt: skip
    finally:
        cleanup_distributed()
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun, rank 0 reports
        return
    scfg = cfg["student"]
    table = Table(title=f"student {out}", title_justify="left", show_header=False)
    table.add_row(
        "architecture", f"{spec.arch} ({len(spec.categories)} classes, {spec.min_size} px)"
    )
    table.add_row("initialised from", str(spec.extra.get("init", init_from)))
    table.add_row(
        "supervision",
        f"{scfg['pseudo_view']} pseudo labels, "
        + ("disentangled" if scfg["disentangle"] and scfg["pseudo_view"] != "raw" else "one set"),
    )
    table.add_row(
        "images",
        f"{data.labeled_images} labeled + {data.unlabeled_images} pseudo-labeled "
        f"(ratio {scfg['unlabeled_ratio']}, weight {scfg['unlabeled_weight']})",
    )
    table.add_row("pseudo boxes", f"{data.cls_boxes} classification, {data.reg_boxes} regression")
    table.add_row("iterations", f"{result.iterations} ({result.iterations_run} in this run)")
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("last loss", f"{result.last_loss:.4f}")
    console.print(table)
