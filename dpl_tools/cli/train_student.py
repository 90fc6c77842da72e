"""Train the student detector on labeled ground truth plus polished pseudo labels.

Each iteration: --batch-size labeled images and on average --unlabeled-ratio
pseudo-labeled images per labeled one; loss = L_labeled + --unlabeled-weight *
L_unlabeled. Disentangled supervision (the paper): RPN and RoI classification learn
from the classification pseudo labels, RoI box regression from the polished boxes.
Ablations: --pseudo-view raw / reg-only / cls-only, --no-disentangle. --negatives: the
unlabeled images' background (hard, ignore, soft). Starts from the teacher or from
ImageNet (--init); strong augmentation by default (--augment, --mixup, --mosaic).
AMP on GPU, DDP under torchrun, periodic checkpoints, --resume as for the teacher.
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
    CheckpointEvery,
    Config,
    Device,
    Iters,
    LabeledAnn,
    Lr,
    Resume,
    RunDir,
    Seed,
    SetValues,
    Workers,
    augment_option,
    default,
    set_overrides,
    setting,
)
from dpl_tools.defaults import STUDENT_INITS
from dpl_tools.models.student_criterion import supervision
from dpl_tools.run_dir import DEFAULT_RUN_DIR, resolve_input, resolve_output
from dpl_tools.tables import ReportTable


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
        str | None,
        typer.Option(
            "--init",
            help="Initial weights: teacher (the --teacher checkpoint), imagenet (a fresh "
            "detector with the config's backbone weights, as STAC), or a detector checkpoint "
            f"path. Default {default('student', 'init')} (config: student.init).",
        ),
    ] = None,
    teacher: Annotated[
        Path | None,
        typer.Option(
            "--teacher",
            help="The teacher checkpoint that made the pseudo labels: the weights of --init "
            "teacher, and the background scorer of --negatives soft "
            "(default: <run-dir>/teacher.pt).",
        ),
    ] = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    config: Config = None,
    pseudo_view: Annotated[
        str | None,
        typer.Option(
            "--pseudo-view",
            help="polished (default); raw (teacher boxes and labels, unpolished); reg-only "
            "(classification from the teacher boxes, regression from the polished ones); "
            "cls-only (classification pseudo labels, regression from the teacher boxes).",
            callback=setting("student", "pseudo_view"),
        ),
    ] = None,
    negatives: Annotated[
        str | None,
        typer.Option(
            "--negatives",
            help="Background of the unlabeled images: hard (every proposal matching no "
            "classification pseudo label), ignore (teacher boxes not kept for classification "
            "are ignore regions), soft (background weighted by the teacher's background "
            f"probability; loads --init). Default {default('student', 'negatives')}.",
            callback=setting("student", "negatives"),
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
            help="Pseudo-labeled images per labeled image in a batch "
            f"(>= 0, default {default('student', 'unlabeled_ratio')}).",
            callback=setting("student", "unlabeled_ratio"),
        ),
    ] = None,
    unlabeled_weight: Annotated[
        float | None,
        typer.Option(
            "--unlabeled-weight",
            help="Weight of the pseudo-labeled images' loss "
            f"(>= 0, default {default('student', 'unlabeled_weight')}).",
            callback=setting("student", "unlabeled_weight"),
        ),
    ] = None,
    augment: Annotated[str | None, augment_option("student")] = None,
    pseudo_augment: Annotated[
        str | None,
        typer.Option(
            "--pseudo-augment",
            help="Augmentation of the pseudo-labeled images only (weak or strong; default: "
            "as --augment).",
            callback=setting("student", "pseudo_augment"),
        ),
    ] = None,
    mixup: Annotated[
        float | None,
        typer.Option(
            "--mixup",
            help="Chance that a pseudo-labeled image is mixed up with another one (MixPL; "
            f"0..1, default {default('student', 'mixup')}).",
            callback=setting("student", "mixup"),
        ),
    ] = None,
    mosaic: Annotated[
        float | None,
        typer.Option(
            "--mosaic",
            help="Chance that a pseudo-labeled image is a 2 x 2 mosaic with three others "
            f"(MixPL; 0..1, default {default('student', 'mosaic')}).",
            callback=setting("student", "mosaic"),
        ),
    ] = None,
    iters: Iters = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            help="Labeled images per iteration per process (>= 1).",
            callback=setting("student", "batch_size"),
        ),
    ] = None,
    lr: Lr = None,
    workers: Workers = None,
    device: Device = "auto",
    seed: Seed = 0,
    resume: Resume = False,
    checkpoint_every: CheckpointEvery = None,
    allow_outside_root: AllowOutsideRoot = False,
    allow_empty: Annotated[
        bool,
        typer.Option(
            "--allow-empty",
            help="Train even when the pseudo labels hold no usable box (warns loudly); "
            "by default that is an error.",
        ),
    ] = False,
    set_values: SetValues = None,
) -> None:
    console = Console()
    flags = {
        "student": {
            "iters": iters, "batch_size": batch_size, "lr": lr, "workers": workers,
            "checkpoint_every": checkpoint_every, "pseudo_view": pseudo_view,
            "negatives": negatives, "disentangle": disentangle,
            "unlabeled_ratio": unlabeled_ratio, "unlabeled_weight": unlabeled_weight,
            "allow_empty": allow_empty or None, "augment": augment,
            "pseudo_augment": pseudo_augment, "mixup": mixup, "mosaic": mosaic,
            "init": init if init in STUDENT_INITS else None,
        },
    }  # fmt: skip
    sets = set_overrides(set_values)
    cfg = api.stage_config(config, "student", flags=flags, sets=sets)
    ann = resolve_input(ann, run_dir, "labeled")
    pseudo = resolve_input(pseudo, run_dir, "labels")
    out = resolve_output(out, run_dir, "student")
    init = api.student_init(None if init in STUDENT_INITS else init, cfg)
    needs_teacher = init == "teacher" or cfg["student"]["negatives"] == "soft" or teacher
    teacher_ckpt = (
        resolve_input(teacher, run_dir, "teacher", "--teacher") if needs_teacher else None
    )
    trained = api.train_student(
        ann, images, pseudo, out, cfg, teacher=teacher_ckpt, init=init,
        unlabeled_images=unlabeled_images, device=device, seed=seed, resume=resume,
        allow_outside_root=allow_outside_root, console=console,
    )  # fmt: skip
    spec, result, data = trained.spec, trained.result, trained.data
    init_from = trained.extra["init"]
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun, rank 0 reports
        return
    scfg = cfg["student"]
    table = ReportTable(title=f"student {out}", title_justify="left", show_header=False)
    table.add_row(
        "architecture", f"{spec.arch} ({len(spec.categories)} classes, {spec.min_size} px)"
    )
    table.add_row("initialised from", str(spec.extra.get("init", init_from)))
    two_sets = supervision(scfg["pseudo_view"], scfg["disentangle"]).reg is not None
    sets = "disentangled" if two_sets else "one set"
    table.add_row(
        "supervision", f"{scfg['pseudo_view']} pseudo labels, {sets}, {scfg['negatives']} negatives"
    )
    table.add_row(
        "images",
        f"{data.labeled_images} labeled + {data.unlabeled_images} pseudo-labeled "
        f"(ratio {scfg['unlabeled_ratio']}, weight {scfg['unlabeled_weight']})",
    )
    table.add_row("pseudo boxes", f"{data.cls_boxes} classification, {data.reg_boxes} regression")
    if data.ignore_boxes:
        table.add_row("ignore regions", f"{data.ignore_boxes} (teacher boxes not kept)")
    if data.dropped_rows:
        table.add_row("dropped rows", f"{data.dropped_rows} (unusable box or label)")
    table.add_row("iterations", f"{result.iterations} ({result.iterations_run} in this run)")
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("last loss", f"{result.last_loss:.4f}")
    console.print(table)
