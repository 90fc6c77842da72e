"""Options shared by several commands, so they read and behave the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

RunDir = Annotated[
    Path,
    typer.Option(
        "--run-dir",
        help="Run directory: this stage writes its artifact here and finds earlier stages' "
        "artifacts here (explicit paths override).",
    ),
]
Device = Annotated[
    str,
    typer.Option(
        "--device", help="Torch device: auto (CUDA if present, else CPU), cpu, cuda, cuda:1."
    ),
]
Seed = Annotated[
    int, typer.Option("--seed", help="Random seed; the same seed gives the same result on CPU.")
]
Config = Annotated[
    str | None,
    typer.Option(
        "--config",
        help="Preset name (cpu_mobilenet, coco_r50_fpn, voc_r50_fpn, demo) or a YAML path; "
        "flags given on the command line override it.",
    ),
]
LabeledAnn = Annotated[
    Path | None,
    typer.Option("--ann", help="Labeled COCO JSON (default: <run-dir>/split/labeled.json)."),
]
Iters = Annotated[int | None, typer.Option("--iters", help="Training iterations (total).")]
Lr = Annotated[float | None, typer.Option("--lr", help="Base SGD learning rate.")]
Workers = Annotated[int | None, typer.Option("--workers", help="DataLoader worker processes.")]
Resume = Annotated[
    bool, typer.Option("--resume", help="Continue from the last checkpoint of this --out.")
]
CheckpointEvery = Annotated[
    int | None,
    typer.Option(
        "--checkpoint-every", help="Write a checkpoint every N iterations (0: only at the end)."
    ),
]
