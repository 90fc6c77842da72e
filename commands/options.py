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
    Path | None,
    typer.Option("--config", help="YAML preset (see configs/), e.g. configs/cpu_mobilenet.yaml."),
]
