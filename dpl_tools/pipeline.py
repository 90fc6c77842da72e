"""The whole pipeline as a list of stages, each skipped when its output is current.

A stage is a ``dpl`` sub-command line plus the files it reads and the file it writes.
After a stage runs, a stamp (``<run-dir>/.stages/<name>.json``) records its command line
and the content hashes of its inputs; a later run skips the stage when its output exists
and the stamp still matches, and reruns it (and so every stage after it whose inputs
change) otherwise. Stages run in-process through the same typer app as the CLI, so a
pipeline run behaves exactly like typing the commands.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dpl_tools.config import merge, preset_path, read_yaml
from dpl_tools.errors import DplError
from dpl_tools.io import atomic_path, sha256_file, write_json


@dataclass
class Stage:
    """One pipeline step: ``dpl <argv...>`` reading ``inputs`` and writing ``output``."""

    name: str
    argv: list[str]
    output: Path
    inputs: list[Path] = field(default_factory=list)

    def fingerprint(self) -> dict:
        """What the output depends on: the command line and the inputs' contents."""
        return {
            "argv": [str(a) for a in self.argv],
            "inputs": {str(p): sha256_file(p) if p.is_file() else None for p in self.inputs},
        }


def stamp_path(run_dir: Path, stage: Stage) -> Path:
    return run_dir / ".stages" / f"{stage.name}.json"


def is_current(run_dir: Path, stage: Stage) -> bool:
    """True when the stage's output exists and was made from the same command and inputs."""
    stamp = stamp_path(run_dir, stage)
    if not stage.output.exists() or not stamp.is_file():
        return False
    try:
        return json.loads(stamp.read_text()) == stage.fingerprint()
    except (OSError, json.JSONDecodeError):
        return False


def run_stages(
    stages: Sequence[Stage],
    run_dir: Path,
    invoke: Callable[[list[str]], None],
    on_event: Callable[[str, Stage], None] | None = None,
    force: bool = False,
) -> list[str]:
    """Run each stage whose output is not current; returns the names of those that ran."""
    ran = []
    for stage in stages:
        if not force and is_current(run_dir, stage):
            if on_event:
                on_event("skip", stage)
            continue
        if on_event:
            on_event("start", stage)
        invoke([str(a) for a in stage.argv])
        write_json(stamp_path(run_dir, stage), stage.fingerprint())
        ran.append(stage.name)
    return ran


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
            percent=float(section.get("percent", 10.0)),
            fold=int(section.get("fold", 1)),
            seed=int(section.get("seed", 0)),
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
    raw = read_yaml(path)
    if "data" not in raw:
        raise DplError(f"{path}: a run config needs a data section (ann, images, ...)")
    data = PipelineData.from_config(raw["data"], path.parent)
    run = raw.get("run", {})
    run_dir = Path(run_dir or run.get("run_dir", "dpl-run"))
    sections = {k: v for k, v in raw.items() if k not in ("data", "run")}
    if run.get("preset"):
        sections = merge(read_yaml(preset_path(run["preset"])), sections)
    resolved = run_dir / "config.yaml"
    text = yaml.safe_dump(sections, sort_keys=True)
    if not resolved.is_file() or resolved.read_text() != text:
        with atomic_path(resolved) as tmp:
            tmp.write_text(text)
    return data, run_dir, resolved


def round_dir(run_dir: Path, k: int) -> Path:
    """Run directory of self-training round ``k`` (round 1 is the run directory itself)."""
    return run_dir if k == 1 else run_dir / f"round-{k}"


def pipeline_stages(
    data: PipelineData, run_dir: Path, config: str | None, rounds: int = 1, device: str = "auto"
) -> list[Stage]:
    """The stages of ``dpl run``: split, then per round teacher (round 1) or previous student,
    synth-noise, train-polisher, polish, train-student, and the evaluations."""
    cfg = ["--config", str(config)] if config else []
    dev = ["--device", device]
    split = run_dir / "split"
    labeled, unlabeled, unlabeled_gt = (
        split / "labeled.json",
        split / "unlabeled.json",
        split / "unlabeled_gt.json",
    )
    config_inputs = [Path(config)] if config and Path(config).is_file() else []
    stages = [
        Stage(
            "split",
            [
                "split",
                data.ann,
                "--percent",
                data.percent,
                "--fold",
                data.fold,
                "--seed",
                data.seed,
                "--out-dir",
                split,
            ],
            labeled,
            [data.ann],
        ),
        Stage(
            "train-teacher",
            [
                "train-teacher",
                "--ann",
                labeled,
                "--images",
                data.images,
                "--out",
                run_dir / "teacher.pt",
                "--seed",
                data.seed,
                *cfg,
                *dev,
            ],
            run_dir / "teacher.pt",
            [labeled, *config_inputs],
        ),
    ]
    teacher = run_dir / "teacher.pt"
    for k in range(1, rounds + 1):
        rd = round_dir(run_dir, k)
        tag = "" if k == 1 else f"-round{k}"
        noise, polisher, labels, student = (
            rd / "noise.parquet",
            rd / "polisher.pt",
            rd / "labels.parquet",
            rd / "student.pt",
        )
        stages += [
            Stage(
                f"synth-noise{tag}",
                [
                    "synth-noise",
                    "--ann",
                    labeled,
                    "--out",
                    noise,
                    "--seed",
                    data.seed + k - 1,
                    *cfg,
                ],
                noise,
                [labeled, *config_inputs],
            ),
            Stage(
                f"train-polisher{tag}",
                [
                    "train-polisher",
                    "--teacher",
                    teacher,
                    "--noise",
                    noise,
                    "--ann",
                    labeled,
                    "--images",
                    data.images,
                    "--out",
                    polisher,
                    "--seed",
                    data.seed,
                    *cfg,
                    *dev,
                ],
                polisher,
                [teacher, noise, labeled, *config_inputs],
            ),
            Stage(
                f"polish{tag}",
                [
                    "polish",
                    "--images",
                    unlabeled,
                    "--image-root",
                    data.images,
                    "--out",
                    labels,
                    "--teacher",
                    teacher,
                    "--polisher",
                    polisher,
                    "--overwrite",
                    *dev,
                ],
                labels,
                [teacher, polisher, unlabeled],
            ),
            Stage(
                f"train-student{tag}",
                [
                    "train-student",
                    "--ann",
                    labeled,
                    "--images",
                    data.images,
                    "--pseudo",
                    labels,
                    "--init",
                    teacher,
                    "--out",
                    student,
                    "--seed",
                    data.seed,
                    *cfg,
                    *dev,
                ],
                student,
                [labeled, labels, teacher, *config_inputs],
            ),
            Stage(
                f"evaluate-pseudo{tag}",
                [
                    "evaluate",
                    "--pseudo",
                    labels,
                    "--ann",
                    unlabeled_gt,
                    "--json",
                    rd / "pseudo_quality.json",
                ],
                rd / "pseudo_quality.json",
                [labels, unlabeled_gt],
            ),
        ]
        teacher = student
    if data.test_ann is not None:
        models = [("teacher", run_dir / "teacher.pt")] + [
            (f"student{'' if k == 1 else f'-round{k}'}", round_dir(run_dir, k) / "student.pt")
            for k in range(1, rounds + 1)
        ]
        for name, model in models:
            out = run_dir / "eval" / f"{name}.json"
            stages.append(
                Stage(
                    f"evaluate-{name}",
                    [
                        "evaluate",
                        "--model",
                        model,
                        "--ann",
                        data.test_ann,
                        "--images",
                        data.test_images,
                        "--json",
                        out,
                        *dev,
                    ],
                    out,
                    [model, data.test_ann],
                )
            )
    return stages
