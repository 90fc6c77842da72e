"""Train the teacher detector (Faster R-CNN + FPN) on the labeled images.

SGD with warm-up and step decay, flip + multi-scale resize, AMP on GPU,
DDP under torchrun (--batch-size is per process). Settings: built-in
defaults < --config preset < flags. Periodic checkpoints go to
<out stem>.last.pt; --resume continues from there (or from --out, to
train a finished teacher further with a larger --iters).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dpl_tools import api
from dpl_tools.cli.options import (
    AllowOutsideRoot,
    Config,
    Device,
    Resume,
    RunDir,
    Seed,
    SetValues,
    set_overrides,
)
from dpl_tools.cli.setting_flags import Flags, with_setting_flags
from dpl_tools.run_dir import DEFAULT_RUN_DIR, resolve_output
from dpl_tools.tables import ReportTable

# The teacher settings with a flag of their own (any other: --set teacher.KEY=VALUE).
TEACHER_FLAGS = ("iters", "batch_size", "lr", "augment", "workers", "checkpoint_every")


@with_setting_flags({"model": ("arch", "min_size", "max_size"), "teacher": TEACHER_FLAGS})
def command(
    ann: Annotated[
        Path, typer.Option("--ann", help="Labeled COCO JSON (e.g. split/labeled.json).")
    ],
    images: Annotated[
        Path, typer.Option("--images", help="Folder the file names in --ann are relative to.")
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Checkpoint to write (default: <run-dir>/teacher.pt)."),
    ] = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    config: Config = None,
    backbone_weights: Annotated[
        str | None,
        typer.Option(
            "--backbone-weights", help="imagenet (torchvision weights), none, or a checkpoint path."
        ),
    ] = None,
    device: Device = "auto",
    seed: Seed = 0,
    resume: Resume = False,
    allow_outside_root: AllowOutsideRoot = False,
    set_values: SetValues = None,
    flags: Flags | None = None,
) -> None:
    console = Console()
    flags = dict(flags or {})
    flags["model"] = {**flags["model"], "backbone_weights": backbone_weights}
    out = resolve_output(out, run_dir, "teacher")
    trained = api.train_teacher(
        ann, images, out, config, device=device, seed=seed, resume=resume,
        allow_outside_root=allow_outside_root, console=console, flags=flags,
        sets=set_overrides(set_values),
    )  # fmt: skip
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, rank 0 reports
        print_teacher(console, trained)


def print_teacher(console: Console, trained: api.TrainedDetector) -> None:
    """The trained teacher's table: architecture, iterations, time, last loss."""
    spec, result = trained.spec, trained.result
    table = ReportTable(
        title=f"teacher {trained.checkpoint}", title_justify="left", show_header=False
    )
    table.add_row(
        "architecture", f"{spec.arch} ({len(spec.categories)} classes, {spec.min_size} px)"
    )
    table.add_row("iterations", f"{result.iterations} ({result.iterations_run} in this run)")
    table.add_row("time", f"{result.seconds:.1f} s ({result.images_per_s:.2f} images/s)")
    table.add_row("last loss", f"{result.last_loss:.4f}")
    console.print(table)
