"""Options shared by several commands, so they read and behave the same everywhere.

Every numeric option is checked when the command line is parsed (a one-line usage error,
exit status 2, before any data is read): options of a config setting with that setting's
rule from the defaults table (``setting``), so a flag and a YAML value obey the same
range; the others with a range of their own (``within``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from dpl_tools.defaults import SETTINGS
from dpl_tools.errors import DplError
from dpl_tools.pipeline import Stage
from dpl_tools.settings import AT_LEAST_1, NON_NEGATIVE, Range, Setting, SettingError
from dpl_tools.textfiles import parse_yaml


def check_with(rule: Setting) -> Callable[[Any], Any]:
    """A typer callback checking a flag's value against ``rule`` (None: not given)."""

    def callback(value: Any) -> Any:
        if value is None:
            return None
        try:
            return rule.check(value)
        except SettingError as e:
            raise typer.BadParameter(str(e)) from None

    return callback


def setting(section: str, key: str) -> Callable[[Any], Any]:
    """The callback of a flag that sets config key ``section.key``: the table's rule."""
    return check_with(SETTINGS[section][key])


def default(section: str, key: str) -> str:
    """A setting's default as shown in help texts (from the table, never retyped)."""
    value = SETTINGS[section][key].default
    return f"{value:g}" if isinstance(value, float) else str(value)


def within(valid: Range, kind: type = int) -> Callable[[Any], Any]:
    """The callback of a numeric flag that is not a config key: ``valid`` numbers only."""
    return check_with(Setting(None, range=valid, nullable=True, kind=kind))


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
    int,
    typer.Option(
        "--seed",
        help="Random seed (>= 0); the same seed gives the same result on CPU.",
        callback=within(NON_NEGATIVE),
    ),
]
Jobs = Annotated[
    int,
    typer.Option(
        "--jobs",
        help="Stages at once (>= 1). 1: one after another in this process, on all cores. "
        "N > 1: a stage starts once the stages it reads from are done, as its printed dpl "
        "command in a subprocess (output in <run-dir>/logs/<stage>.log); the stages making "
        "the pseudo labels run alone on all cores, students and evaluations N at a time on "
        "cores/N threads. For machines with many cores (on 2 cores it did not pay). The "
        "same N gives the same result; another N changes the last bits.",
        callback=within(AT_LEAST_1),
    ),
]
Config = Annotated[
    str | None,
    typer.Option(
        "--config",
        help="Preset name (cpu_mobilenet, coco_r50_fpn, voc_r50_fpn, demo) or a YAML path; "
        "flags given on the command line override it.",
    ),
]
SetValues = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Any config setting as section.key=value (YAML value, repeatable), e.g. "
        "--set student.aug_scale=[0.5,1.5]; checked like a config file, applied last.",
    ),
]


def set_overrides(values: list[str] | None) -> dict[str, dict[str, Any]]:
    """``--set section.key=value`` pairs as config overrides (values parsed as YAML; a
    dotted key reaches into a mapping setting, e.g. ``model.detector_kwargs.KEY``); a
    malformed pair is a usage error. Keys and values are checked by ``load_config``."""
    out: dict[str, dict[str, Any]] = {}
    for item in values or []:
        name, sep, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not section or not key:
            raise typer.BadParameter(
                f"--set {item!r}: expected section.key=value, e.g. student.mixup=0.5"
            )
        try:
            value = parse_yaml(text, f"--set {item!r}") if text.strip() else None
        except DplError as e:  # "--set '...': not valid YAML (...)", or an alias bomb
            raise typer.BadParameter(str(e)) from None
        *parents, last = key.split(".")  # model.detector_kwargs.box_batch_size_per_image
        node = out.setdefault(section, {})
        for depth, parent in enumerate(parents, start=1):
            node = node.setdefault(parent, {})
            if not isinstance(node, dict):  # an earlier --set gave this key a value
                taken = ".".join([section, *parents[:depth]])
                raise typer.BadParameter(f"--set {item!r}: {taken} is set to a value already")
        node[last] = value
    return out


def augment_option(section: str, flag: str = "--augment", key: str = "augment") -> Any:
    """The ``--augment`` flag of a detector-training section (weak or strong)."""
    return typer.Option(
        flag,
        help="Training augmentation: weak (flip + multi-scale) or strong (also a colour op, "
        "scale jitter + shift, Cutout; see dpl show --augment). "
        f"Default {default(section, key)}.",
        callback=setting(section, key),
    )


LabeledAnn = Annotated[
    Path | None,
    typer.Option("--ann", help="Labeled COCO JSON (default: <run-dir>/split/labeled.json)."),
]
Iters = Annotated[
    int | None,
    typer.Option(
        "--iters", help="Training iterations (total, >= 1).", callback=setting("teacher", "iters")
    ),
]
Lr = Annotated[
    float | None,
    typer.Option("--lr", help="Base SGD learning rate (> 0).", callback=setting("teacher", "lr")),
]
Workers = Annotated[
    int | None,
    typer.Option(
        "--workers", help="DataLoader worker processes.", callback=setting("teacher", "workers")
    ),
]
Resume = Annotated[
    bool, typer.Option("--resume", help="Continue from the last checkpoint of this --out.")
]
CheckpointEvery = Annotated[
    int | None,
    typer.Option(
        "--checkpoint-every",
        help="Write a checkpoint every N iterations (0: only at the end).",
        callback=setting("teacher", "checkpoint_every"),
    ),
]
NoiseModel = Annotated[
    str | None,
    typer.Option(
        "--noise-model",
        help="gaussian (the paper's), empirical (teacher errors on --heldout-ann) or crossfit "
        "(K fold teachers' out-of-fold errors on the labeled images, no test split; costs "
        "K x crossfit_iters_fraction teacher trainings, K-1 by default).",
        callback=setting("polisher", "noise_model"),
    ),
]
CrossfitFolds = Annotated[
    int | None,
    typer.Option(
        "--crossfit-folds",
        help=f"crossfit: folds of the labeled images ({default('polisher', 'crossfit_folds')}).",
        callback=setting("polisher", "crossfit_folds"),
    ),
]
CrossfitItersFraction = Annotated[
    float | None,
    typer.Option(
        "--crossfit-iters-fraction",
        help="crossfit: fold teacher iterations as a fraction of the teacher's (default: "
        "(K-1)/K, the teacher's iterations per labeled image).",
        callback=setting("polisher", "crossfit_iters_fraction"),
    ),
]
DetectionClasses = Annotated[
    Path | None,
    typer.Option(
        "--detection-classes",
        help="The labeler's class names for --detections: data.yaml, classes.txt or a COCO "
        "JSON (default: dpl's categories; a YOLO folder's own classes.txt if present).",
    ),
]
CategoryMap = Annotated[
    Path | None,
    typer.Option(
        "--category-map",
        help="YAML/JSON mapping labeler class name -> dpl category name (null drops it).",
    ),
]
AllowOutsideRoot = Annotated[
    bool,
    typer.Option(
        "--allow-outside-root",
        help="Read images whose file_name is absolute or climbs out of the image folder "
        "with '..', or (an image folder listed) that lie in a linked folder leading outside "
        "it (refused / skipped by default).",
    ),
]


# Shared CLI helpers (console output and in-process sub-commands), so that no command
# module imports another.


def show_stage_result(console: Console, stage: Stage, result: Any) -> None:
    """What the stage's own command prints after it ran: the printer of the CLI module
    whose command returns this kind of result (polish prints its own summary)."""
    from dpl_tools import api
    from dpl_tools.cli import (
        evaluate,
        split,
        synth_noise,
        train_polisher,
        train_student,
        train_teacher,
    )
    from dpl_tools.engine.polisher_noise import NoiseFile

    detector_printers = {
        "teacher": train_teacher.print_teacher,
        "student": train_student.print_student,
        "online student": train_student.print_online_student,
    }
    printers: dict[type, Callable[[Console, Any], None]] = {
        api.SplitFiles: split.print_split,
        NoiseFile: synth_noise.print_noise,
        api.TrainedPolisher: train_polisher.print_polisher,
        api.TrainedDetector: lambda c, trained: detector_printers[trained.role](c, trained),
        api.Evaluation: evaluate.print_evaluation,
        api.PseudoQuality: evaluate.print_pseudo_quality,
    }
    printer = printers.get(type(result))
    if printer is not None:
        printer(console, result)


def stage_printer(console: Console) -> Callable[[str, Stage], None]:
    """Print one line per pipeline stage as it starts (its ``dpl`` command), resumes an
    interrupted run of itself (``--resume``), or is skipped."""

    def on_event(event: str, stage: Stage) -> None:
        if event == "skip":
            console.print(f"[dim]- {stage.name}: up to date ({stage.output})[/]")
        else:
            more = " --resume (continues the interrupted run)" if event == "resume" else ""
            console.print(f"[bold cyan]> {stage.name}[/]: dpl {' '.join(stage.argv)}{more}")

    return on_event


def stage_runner(
    console: Console, run_dir: Path | None = None, jobs: int = 1
) -> Callable[[Stage, bool], None]:
    """Run a pipeline stage in this process (``Stage.call``, the API function its command
    calls) and print what its command prints: the split, the trained models' tables, the
    noise pairs, the metrics or pseudo-label quality (polish prints its own summary).
    ``jobs`` > 1 stages at once: each runs as its printed command in a subprocess with
    its share of the cores (``stage_jobs.stage_process``, logged under ``run_dir``)."""
    if jobs > 1:
        from dpl_tools.stage_jobs import stage_process

        if run_dir is None:
            raise ValueError("stage_runner: several jobs need the run directory for their logs")
        return stage_process(console, run_dir, jobs)

    def invoke(stage: Stage, resume: bool) -> None:
        result = stage.call(resume, console)
        if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, rank 0 reports
            show_stage_result(console, stage, result)

    return invoke
