"""The whole pipeline as a list of stages, each skipped when its output is current.

A stage is a call of a ``dpl_tools.api`` function with its keywords, the files it reads
and the file it writes; each kind of stage is declared once below (``teacher_stage``,
``student_stage``, ...) and reused by ``dpl run`` and ``dpl demo``. Its ``dpl`` command
line is derived from the declaration, for printing and for the stamps.
After a stage runs, a stamp (``<run-dir>/.stages/<name>.json``) records its command line
and the content hashes of its inputs; a later run skips the stage when its output exists
and the stamp still matches, and reruns it (and so every stage after it whose inputs
change) otherwise. Stages run in this process through the API functions that the
commands call, so a pipeline run behaves like typing the printed commands.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpl_tools.config import check_together, merge, preset_path, read_config
from dpl_tools.defaults import RUN_SETTINGS
from dpl_tools.errors import DplError
from dpl_tools.io import atomic_path, sha256_file, write_json

# The flag of an API keyword when it is not ``--`` + the keyword with dashes; keywords
# given as positional arguments, by function.
FLAGS = {"json_out": "--json", "unlabeled_root": "--unlabeled-images"}
POSITIONAL = {"split": ("ann",)}
# API functions run by another command than their own name
COMMANDS = {"train_student_online": "train-student", "evaluate_pseudo": "evaluate"}


@dataclass
class Stage:
    """One pipeline step: the ``dpl_tools.api`` function ``function`` called with
    ``params`` (its keywords), reading ``inputs`` and writing ``output``. Its ``dpl``
    command line is derived from the same declaration, so what a run prints is exactly
    what a user can type to rerun the stage by hand."""

    name: str
    function: str
    params: dict[str, Any]
    output: Path
    inputs: list[Path] = field(default_factory=list)

    @property
    def command(self) -> str:
        """The ``dpl`` sub-command of the stage."""
        return COMMANDS.get(self.function, self.function.replace("_", "-"))

    @property
    def argv(self) -> list[str]:
        """The ``dpl`` argument list: command, positional arguments, then each keyword as
        its flag (``True`` is a bare flag; ``None`` and ``False`` leave it out)."""
        positional = POSITIONAL.get(self.function, ())
        argv = [self.command, *(str(self.params[k]) for k in positional)]
        for key, value in self.params.items():
            if key in positional or value is None or value is False:
                continue
            flag = FLAGS.get(key, "--" + key.replace("_", "-"))
            argv += [flag] if value is True else [flag, str(value)]
        return argv

    def command_line(self, resume: bool = False) -> list[str]:
        """``argv``, with ``--resume`` when continuing an interrupted training stage."""
        return [*self.argv, "--resume"] if resume else self.argv

    def call(self, resume: bool = False, console: Any = None) -> Any:
        """Run the stage in this process: its API function with its keywords; returns the
        function's result object."""
        import inspect

        from dpl_tools import api

        function = getattr(api, self.function)
        extra = {"resume": resume} if self.function in RESUMABLE else {}
        if "console" in inspect.signature(function).parameters:
            extra["console"] = console
        params = {k: v for k, v in self.params.items() if v is not None}  # as in argv
        return function(**params, **extra)

    def fingerprint(self) -> dict:
        """What the output depends on: the command line and the inputs' contents."""
        return {
            "argv": self.argv,
            "inputs": {str(p): sha256_file(p) if p.is_file() else None for p in self.inputs},
        }


def stamp_path(run_dir: Path, stage: Stage, suffix: str = "") -> Path:
    return run_dir / ".stages" / f"{stage.name}{suffix}.json"


def is_current(run_dir: Path, stage: Stage) -> bool:
    """True when the stage's output exists and was made from the same command and inputs."""
    stamp = stamp_path(run_dir, stage)
    if not stage.output.exists() or not stamp.is_file():
        return False
    try:
        return json.loads(stamp.read_text()) == stage.fingerprint()
    except (OSError, json.JSONDecodeError):
        return False


# Training stages whose periodic checkpoint (<out stem>.last.pt) ``--resume`` continues.
RESUMABLE = ("train_teacher", "train_polisher", "train_student", "train_student_online")


def resumes(run_dir: Path, stage: Stage) -> bool:
    """Whether a training stage was interrupted: started with this very command and these
    inputs (its ``.started`` stamp), its output not written, its periodic checkpoint there.
    Then rerunning continues from that checkpoint instead of starting over."""
    from dpl_tools.engine.loop import last_checkpoint_path

    if stage.function not in RESUMABLE or stage.output.exists():
        return False
    started = stamp_path(run_dir, stage, ".started")
    if not (started.is_file() and last_checkpoint_path(stage.output).is_file()):
        return False
    try:
        return json.loads(started.read_text()) == stage.fingerprint()
    except (OSError, json.JSONDecodeError):
        return False


Invoke = Callable[[Stage, bool], Any]


def run_stages(
    stages: Sequence[Stage],
    run_dir: Path,
    invoke: Invoke | None = None,
    on_event: Callable[[str, Stage], None] | None = None,
    force: bool = False,
    jobs: int = 1,
) -> list[str]:
    """Run each stage whose output is not current; returns the names of those that ran.
    ``invoke(stage, resume)`` runs one (default: ``stage.call`` in this process). A
    training stage that was interrupted (``resumes``) continues with resume; the event
    is then "resume" instead of "start". ``jobs`` > 1: up to that many stages at once,
    each once the stages writing its inputs are done (``stage_jobs.run_concurrently``;
    ``invoke`` is then called from worker threads)."""
    invoke = invoke or (lambda stage, resume: stage.call(resume))

    def run_one(stage: Stage) -> bool:
        if not force and is_current(run_dir, stage):
            if on_event:
                on_event("skip", stage)
            return False
        resume = not force and resumes(run_dir, stage)
        if on_event:
            on_event("resume" if resume else "start", stage)
        if stage.function in RESUMABLE and not resume:
            write_json(stamp_path(run_dir, stage, ".started"), stage.fingerprint())
        invoke(stage, resume)
        write_json(stamp_path(run_dir, stage), stage.fingerprint())
        return True

    if jobs > 1:
        from dpl_tools.stage_jobs import run_concurrently

        return run_concurrently(stages, run_one, jobs)
    return [stage.name for stage in stages if run_one(stage)]


DATA_DEFAULTS = RUN_SETTINGS["data"]  # a run config's data section (split settings)


@dataclass
class PipelineData:
    """Where a pipeline's data is: the pool to split, its images, and an optional test set."""

    ann: Path
    images: Path
    percent: float = 10.0
    fold: int = 1
    seed: int = 0
    test_ann: Path | None = None
    test_images: Path | None = None

    @classmethod
    def from_config(cls, section: dict, base: Path) -> PipelineData:
        """Read the ``data:`` section of a run config; relative paths are relative to ``base``."""

        def path(key: str) -> Path | None:
            value = section.get(key)
            return None if value is None else (base / str(value))

        missing = [k for k in ("ann", "images") if k not in section]
        if missing:
            raise DplError(f"config data section is missing {', '.join(missing)}")
        return cls(
            ann=path("ann"),
            images=path("images"),
            percent=float(section.get("percent", DATA_DEFAULTS["percent"].default)),
            fold=int(section.get("fold", DATA_DEFAULTS["fold"].default)),
            seed=int(section.get("seed", DATA_DEFAULTS["seed"].default)),
            test_ann=path("test_ann"),
            test_images=path("test_images") or path("images"),
        )


def load_run_config(
    path: str | Path, run_dir: Path | None = None
) -> tuple[PipelineData, Path, Path]:
    """Read a ``dpl run`` config: (data, run directory, resolved stage config path).

    The stage settings (``run.preset`` merged with the file's own sections) are written to
    ``<run-dir>/config.yaml``, which every stage then reads with ``--config``.
    """
    path = preset_path(path)
    raw = read_config(path, run_config=True)
    if "data" not in raw:
        raise DplError(f"{path}: a run config needs a data section (ann, images, ...)")
    data = PipelineData.from_config(raw["data"], path.parent)
    run = raw.get("run", {})
    run_dir = Path(run_dir or run.get("run_dir", "dpl-run"))
    sections = {k: v for k, v in raw.items() if k not in ("data", "run")}
    if run.get("preset"):
        sections = merge(read_config(preset_path(run["preset"])), sections)
    try:
        check_together(sections)
    except DplError as e:
        raise DplError(f"{path}: {e}") from None
    return data, run_dir, write_stage_config(run_dir, sections)


def write_stage_config(run_dir: Path, sections: dict[str, Any]) -> Path:
    """``<run-dir>/config.yaml``: the resolved settings every stage reads with --config
    (rewritten only when they changed, so finished stages stay up to date)."""
    resolved = run_dir / "config.yaml"
    text = yaml.safe_dump(sections, sort_keys=True)
    if not resolved.is_file() or resolved.read_text() != text:
        with atomic_path(resolved) as tmp:
            tmp.write_text(text)
    return resolved


def round_dir(run_dir: Path, k: int) -> Path:
    """Run directory of self-training round ``k`` (round 1 is the run directory itself)."""
    return run_dir if k == 1 else run_dir / f"round-{k}"


# One declaration per stage kind: its API function, keywords, output and inputs. ``config``
# is the preset name or YAML path of the stages; a config *file* is an input, so editing
# it reruns every stage that reads it.


def _config_inputs(config: str | None) -> list[Path]:
    return [Path(config)] if config and Path(config).is_file() else []


def split_stage(data: PipelineData, split_dir: Path) -> Stage:
    """``dpl split``: the labeled / unlabeled / unlabeled_gt JSONs of the SSOD protocol."""
    params = {"ann": data.ann, "percent": data.percent, "fold": data.fold, "seed": data.seed}
    params["out_dir"] = split_dir
    return Stage("split", "split", params, split_dir / "labeled.json", [data.ann])


def teacher_stage(
    labeled: Path, images: Path, out: Path, seed: int, config: str | None, device: str
) -> Stage:
    """``dpl train-teacher`` on the labeled images."""
    params = {"ann": labeled, "images": images, "out": out, "seed": seed}
    params |= {"config": config, "device": device}
    return Stage("train-teacher", "train_teacher", params, out, [labeled, *_config_inputs(config)])


def synth_noise_stage(
    name: str,
    labeled: Path,
    out: Path,
    seed: int,
    config: str | None,
    teacher: tuple[Path, Path, str] | None = None,
) -> Stage:
    """``dpl synth-noise``: the polishers' training box pairs from the labeled boxes;
    ``teacher`` (teacher, images, device) for the noise models that run the teacher
    (empirical, crossfit: its fold teachers and ``crossfit.parquet`` go beside ``out``)."""
    params = {"ann": labeled, "out": out, "seed": seed, "config": config}
    inputs = [labeled, *_config_inputs(config)]
    if teacher is not None:
        params |= {"teacher": teacher[0], "images": teacher[1], "device": teacher[2]}
        inputs.insert(1, teacher[0])
    return Stage(name, "synth_noise", params, out, inputs)


def _noise_model(config: str | None) -> str:
    """The config's noise model (gaussian; empirical and crossfit run the teacher)."""
    from dpl_tools.config import load_config

    return load_config(config)["polisher"]["noise_model"]


def labeled_only_settings(config: str | None) -> dict[str, Any]:
    """Student settings of a control without pseudo labels (labeled-only, oracle): no
    pseudo-labeled images, and as many labeled images per step as the full method's
    student sees in all (its batch plus the pseudo-labeled images that come with it), so
    that a control measures labels, not a smaller batch."""
    from dpl_tools.config import load_config

    student = load_config(config)["student"]
    same_images = round(student["batch_size"] * (1 + student["unlabeled_ratio"]))
    return {"unlabeled_ratio": 0, "batch_size": same_images}


def _trains_online(config: str | None) -> bool:
    """Whether the config's student trains online (``student.online``)."""
    from dpl_tools.config import load_config

    return bool(load_config(config)["student"]["online"])


def polisher_stage(
    name: str,
    teacher: Path,
    noise: Path,
    labeled: Path,
    images: Path,
    out: Path,
    seed: int,
    config: str | None,
    device: str,
) -> Stage:
    """``dpl train-polisher`` on the frozen teacher's features of the labeled images."""
    params = {"teacher": teacher, "noise": noise, "ann": labeled, "images": images}
    params |= {"out": out, "seed": seed, "config": config, "device": device}
    inputs = [teacher, noise, labeled, *_config_inputs(config)]
    return Stage(name, "train_polisher", params, out, inputs)


def polish_stage(
    name: str,
    unlabeled: Path,
    image_root: Path,
    out: Path,
    teacher: Path,
    polisher: Path,
    config: str | None,
    device: str,
    extra: dict[str, Any] | None = None,
) -> Stage:
    """``dpl polish``: the pseudo labels of the unlabeled images (rewritten when rerun),
    with the config's ``polish`` thresholds (``extra``: more keywords, e.g.
    ``{"keep_rule": "paper"}``)."""
    params = {"images": unlabeled, "image_root": image_root, "out": out}
    params |= {"teacher": teacher, "polisher": polisher, "overwrite": True}
    params |= {"config": config, "device": device, **(extra or {})}
    inputs = [teacher, polisher, unlabeled, *_config_inputs(config)]
    return Stage(name, "polish", params, out, inputs)


def student_stage(
    name: str,
    labeled: Path,
    images: Path,
    labels: Path | None,
    teacher: Path | None,
    out: Path,
    seed: int,
    config: str | None,
    device: str,
    pseudo_view: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Stage:
    """``dpl train-student`` from the labeled truth and the pseudo labels of ``teacher``
    (its initial weights unless the config's ``student.init`` says imagenet;
    ``pseudo_view`` ``raw``: the unpolished teacher boxes, the baseline; ``extra``: more
    keywords, e.g. ``{"unlabeled_ratio": 0}`` for the labeled-only control (with
    ``labels`` and ``teacher`` None when it starts from ImageNet: it waits for neither))."""
    params = {"ann": labeled, "images": images, "pseudo": labels}
    params |= {"pseudo_view": pseudo_view, "teacher": teacher, "out": out, "seed": seed}
    params |= {"config": config, "device": device, **(extra or {})}
    inputs = [p for p in (labeled, labels, teacher) if p is not None] + _config_inputs(config)
    return Stage(name, "train_student", params, out, inputs)


def online_student_stage(
    name: str,
    labeled: Path,
    images: Path,
    unlabeled: Path,
    teacher: Path,
    polisher: Path,
    out: Path,
    seed: int,
    config: str | None,
    device: str,
) -> Stage:
    """``dpl train-student`` online (``student.online``): the EMA teacher and the
    ``polisher`` label the ``unlabeled`` image list (under ``images``) in the loop."""
    params = {"online": True, "ann": labeled, "images": images, "unlabeled": unlabeled}
    params |= {"unlabeled_root": images, "teacher": teacher, "polisher": polisher, "out": out}
    params |= {"seed": seed}
    params |= {"config": config, "device": device}
    inputs = [labeled, unlabeled, teacher, polisher, *_config_inputs(config)]
    return Stage(name, "train_student_online", params, out, inputs)


def evaluate_pseudo_stage(name: str, labels: Path, truth: Path, out: Path) -> Stage:
    """``dpl evaluate --pseudo``: pseudo-label quality against the unlabeled images' truth."""
    params = {"pseudo": labels, "ann": truth, "json_out": out}
    return Stage(name, "evaluate_pseudo", params, out, [labels, truth])


def evaluate_model_stage(
    name: str, model: Path, ann: Path, images: Path, out: Path, device: str
) -> Stage:
    """``dpl evaluate --model``: COCO AP of a detector on a test set."""
    params = {"model": model, "ann": ann, "images": images, "json_out": out, "device": device}
    return Stage(name, "evaluate", params, out, [model, ann])


def pipeline_stages(
    data: PipelineData, run_dir: Path, config: str | None, rounds: int = 1, device: str = "auto"
) -> list[Stage]:
    """The stages of ``dpl run``: split, then per round teacher (round 1) or previous student,
    synth-noise, train-polisher, polish, train-student, and the evaluations."""
    labeled = run_dir / "split" / "labeled.json"
    teacher = run_dir / "teacher.pt"
    stages = [
        split_stage(data, run_dir / "split"),
        teacher_stage(labeled, data.images, teacher, data.seed, config, device),
    ]
    for k in range(1, rounds + 1):
        stages += round_stages(data, run_dir, k, teacher, config, device)
        teacher = round_dir(run_dir, k) / "student.pt"
    if data.test_ann is not None:
        models = [("teacher", run_dir / "teacher.pt")] + [
            (f"student{'' if k == 1 else f'-round{k}'}", round_dir(run_dir, k) / "student.pt")
            for k in range(1, rounds + 1)
        ]
        for name, model in models:
            out = run_dir / "eval" / f"{name}.json"
            stages.append(
                evaluate_model_stage(
                    f"evaluate-{name}", model, data.test_ann, data.test_images, out, device
                )
            )
    return stages


def round_stages(
    data: PipelineData, run_dir: Path, k: int, teacher: Path, config: str | None, device: str
) -> list[Stage]:
    """Self-training round ``k`` with ``teacher``: synth-noise, train-polisher, polish,
    train-student (offline, or online when the config says so) and pseudo-label quality.

    With the crossfit noise model, rounds after the first train their polisher on round 1's
    box pairs: the fold teachers are trained with the teacher's recipe, which rounds do not
    change, so new folds would redraw errors of the same kind at the cost of two teacher
    trainings a round. The polisher itself is always trained anew on the round's teacher."""
    split, rd = run_dir / "split", round_dir(run_dir, k)
    labeled, unlabeled = split / "labeled.json", split / "unlabeled.json"
    tag = "" if k == 1 else f"-round{k}"
    noise, polisher, labels = rd / "noise.parquet", rd / "polisher.pt", rd / "labels.parquet"
    student, images, seed = rd / "student.pt", data.images, data.seed
    model = _noise_model(config)
    runs_teacher = (teacher, images, device) if model != "gaussian" else None
    noise_stages = [
        synth_noise_stage(f"synth-noise{tag}", labeled, noise, seed + k - 1, config, runs_teacher)
    ]
    if k > 1 and model == "crossfit":
        noise, noise_stages = round_dir(run_dir, 1) / "noise.parquet", []
    if _trains_online(config):
        train = online_student_stage(f"train-student{tag}", labeled, images, unlabeled, teacher,
                                     polisher, student, seed, config, device)  # fmt: skip
    else:
        train = student_stage(f"train-student{tag}", labeled, images, labels, teacher, student,
                              seed, config, device)  # fmt: skip
    return [
        *noise_stages,
        polisher_stage(
            f"train-polisher{tag}", teacher, noise, labeled, images, polisher, seed, config, device
        ),  # fmt: skip
        polish_stage(f"polish{tag}", unlabeled, images, labels, teacher, polisher, config, device),
        train,
        evaluate_pseudo_stage(
            f"evaluate-pseudo{tag}", labels, split / "unlabeled_gt.json", rd / "pseudo_quality.json"
        ),
    ]
