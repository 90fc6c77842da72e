"""Train the student detector on labeled ground truth plus polished pseudo labels.

Each iteration: --batch-size labeled images and on average --unlabeled-ratio
pseudo-labeled images per labeled one; loss = L_labeled + --unlabeled-weight *
L_unlabeled. Disentangled supervision (the paper): RPN and RoI classification learn
from the classification pseudo labels, RoI box regression from the polished boxes.
Ablations: --pseudo-view raw / reg-only / cls-only, --no-disentangle. --negatives: the
unlabeled images' background (hard, ignore, soft). Starts from the teacher or from
ImageNet (--init); weak augmentation by default, strong with --augment strong (and
--mixup, --mosaic).
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
    Config,
    Device,
    LabeledAnn,
    Resume,
    RunDir,
    Seed,
    SetValues,
    default,
    set_overrides,
)
from dpl_tools.cli.setting_flags import Flags, with_setting_flags
from dpl_tools.defaults import STUDENT_INITS
from dpl_tools.run_dir import DEFAULT_RUN_DIR, resolve_input, resolve_output
from dpl_tools.tables import ReportTable

# The student settings with a flag of their own (any other: --set student.KEY=VALUE).
STUDENT_FLAGS = (
    "pseudo_view", "negatives", "disentangle", "unlabeled_ratio", "unlabeled_weight",
    "augment", "pseudo_augment", "mixup", "mosaic", "iters", "batch_size", "lr", "workers",
    "checkpoint_every", "allow_empty", "online", "ema_momentum", "online_polisher",
    "online_polisher_lr", "online_log_every", "online_eval_images",
)  # fmt: skip


ImagesOption = Annotated[
    Path,
    typer.Option("--images", help="Folder the file names in --ann are relative to."),
]
PseudoOption = Annotated[
    Path | None,
    typer.Option(
        "--pseudo",
        help="Pseudo labels from dpl polish (default: <run-dir>/labels.parquet; none with "
        "--unlabeled-ratio 0: a student of the labeled images only, the labeled-only control).",
    ),
]
UnlabeledImagesOption = Annotated[
    Path | None,
    typer.Option(
        "--unlabeled-images",
        help="Folder the pseudo-labeled file names are relative to (default: --images).",
    ),
]
OutOption = Annotated[
    Path | None,
    typer.Option("--out", help="Checkpoint to write (default: <run-dir>/student.pt)."),
]
InitOption = Annotated[
    str | None,
    typer.Option(
        "--init",
        help="Initial weights: teacher (the --teacher checkpoint), imagenet (a fresh "
        "detector with the config's backbone weights, as STAC), or a detector checkpoint "
        f"path. Default {default('student', 'init')} (config: student.init).",
    ),
]
PolisherOption = Annotated[
    Path | None,
    typer.Option(
        "--polisher",
        help="--online: the trained polisher (default: <run-dir>/polisher.pt).",
    ),
]
UnlabeledOption = Annotated[
    Path | None,
    typer.Option(
        "--unlabeled",
        help="--online: the unlabeled images, a folder or a COCO JSON image list whose "
        "file names are under --unlabeled-images (default: <run-dir>/split/"
        "unlabeled.json).",
    ),
]
UnlabeledGtOption = Annotated[
    Path | None,
    typer.Option(
        "--unlabeled-gt",
        help="--online: the unlabeled images' hidden truth (COCO JSON), to log the "
        "pseudo labels' precision, recall and IoU before / after polishing as training "
        "goes (evaluation only: nothing is learned from it).",
    ),
]
TeacherOption = Annotated[
    Path | None,
    typer.Option(
        "--teacher",
        help="The teacher checkpoint that made the pseudo labels: the weights of --init "
        "teacher, and the background scorer of --negatives soft "
        "(default: <run-dir>/teacher.pt).",
    ),
]


@with_setting_flags({"student": STUDENT_FLAGS})
def command(
    images: ImagesOption,
    ann: LabeledAnn = None,
    pseudo: PseudoOption = None,
    unlabeled_images: UnlabeledImagesOption = None,
    out: OutOption = None,
    init: InitOption = None,
    polisher: PolisherOption = None,
    unlabeled: UnlabeledOption = None,
    unlabeled_gt: UnlabeledGtOption = None,
    teacher: TeacherOption = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    config: Config = None,
    device: Device = "auto",
    seed: Seed = 0,
    resume: Resume = False,
    allow_outside_root: AllowOutsideRoot = False,
    set_values: SetValues = None,
    flags: Flags | None = None,
) -> None:
    console = Console()
    flags = {"student": {**(flags or {}).get("student", {}),
                         "init": init if init in STUDENT_INITS else None}}  # fmt: skip
    sets = set_overrides(set_values)
    cfg = api.stage_config(config, "student", flags=flags, sets=sets)
    ann = resolve_input(ann, run_dir, "labeled")
    out = resolve_output(out, run_dir, "student")
    if cfg["student"]["online"]:
        _online(
            console, cfg, ann, images, out, run_dir, teacher, polisher, unlabeled,
            unlabeled_images, unlabeled_gt, device, seed, resume, allow_outside_root,
        )  # fmt: skip
        return
    if pseudo is not None or cfg["student"]["unlabeled_ratio"] > 0:
        pseudo = resolve_input(pseudo, run_dir, "labels")  # else: the labeled images only
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
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, rank 0 reports
        print_student(console, trained)


def print_student(console: Console, trained: api.TrainedDetector) -> None:
    """The trained student's table: what it learned from, and how long it took."""
    spec, result, data = trained.spec, trained.result, trained.data
    out, scfg = trained.checkpoint, trained.config["student"]
    init_from = trained.extra["init"]
    table = ReportTable(title=f"student {out}", title_justify="left", show_header=False)
    table.add_row(
        "architecture", f"{spec.arch} ({len(spec.categories)} classes, {spec.min_size} px)"
    )
    table.add_row("initialised from", str(spec.extra.get("init", init_from)))
    from dpl_tools.models.student_criterion import supervision  # torch: after training only

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


def _online(
    console,
    cfg,
    ann,
    images,
    out,
    run_dir,
    teacher,
    polisher,
    unlabeled,
    unlabeled_images,
    unlabeled_gt,
    device,
    seed,
    resume,
    allow_outside_root,
) -> None:
    """``--online``: the EMA teacher and the polishers label the unlabeled images in the
    loop (``dpl_tools.engine.online``)."""
    unlabeled = resolve_input(unlabeled, run_dir, "unlabeled", "--unlabeled")
    root = unlabeled_images or (images if unlabeled.suffix == ".json" else None)
    trained = api.train_student_online(
        ann, images, unlabeled, resolve_input(teacher, run_dir, "teacher", "--teacher"),
        resolve_input(polisher, run_dir, "polisher", "--polisher"), out, cfg,
        unlabeled_root=root, unlabeled_gt=unlabeled_gt, device=device, seed=seed,
        resume=resume, allow_outside_root=allow_outside_root, console=console,
    )  # fmt: skip
    if int(os.environ.get("RANK", 0)) == 0:
        print_online_student(console, trained)


def print_online_student(console: Console, trained: api.TrainedDetector) -> None:
    """The online student's table: its EMA teacher, the last pseudo labels it made, time."""
    result, log = trained.result, trained.extra["log"]
    momentum = trained.config["student"]["ema_momentum"]
    table = ReportTable(title=f"student {trained.checkpoint} (online)", title_justify="left",
                        show_header=False)  # fmt: skip
    table.add_row("initialised from", f"{trained.extra['init']} (the teacher)")
    table.add_row("EMA teacher", f"{trained.extra['teacher']} (momentum {momentum:g})")
    if "polisher" in trained.extra:
        lr = trained.config["student"]["online_polisher_lr"]
        table.add_row("polishers", f"{trained.extra['polisher']} (trained jointly, lr {lr:g})")
    if log:
        last = log[-1]
        table.add_row("pseudo labels made", f"{last['pseudo_boxes']} teacher boxes, "
                      f"{last['kept_for_classification']} kept for classification")  # fmt: skip
    table.add_row("iterations", f"{result.iterations} ({result.iterations_run} in this run)")
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("last loss", f"{result.last_loss:.4f}")
    console.print(table)
