"""The detector stages from Python: train a teacher or a student, evaluate a model."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from dpl_tools.api.config import ConfigLike, stage_config
from dpl_tools.defaults import STUDENT_INITS
from dpl_tools.engine.loop import TrainResult
from dpl_tools.errors import DplError
from dpl_tools.models.checkpoint import DetectorSpec
from dpl_tools.outputs import check_distinct_outputs
from dpl_tools.runtime import cleanup_distributed


def _is_main() -> bool:
    """Under torchrun only rank 0 reports; a plain process always does."""
    return int(os.environ.get("RANK", 0)) == 0


@dataclass
class TrainedDetector:
    """A trained teacher or student: the checkpoint written and the run's numbers."""

    checkpoint: Path
    spec: DetectorSpec
    result: TrainResult
    config: dict[str, Any]
    data: Any = None  # the student's data counts (StudentData); None for a teacher
    extra: dict[str, Any] = field(default_factory=dict)
    role: str = "teacher"  # teacher, student or online student


def train_teacher(
    ann: str | Path,
    images: str | Path,
    out: str | Path = "runs/teacher.pt",
    config: ConfigLike = None,
    *,
    device: str = "auto",
    seed: int = 0,
    resume: bool = False,
    allow_outside_root: bool = False,
    console: Console | None = None,
    flags: Mapping[str, Mapping[str, Any]] | None = None,
    sets: Mapping[str, Mapping[str, Any]] | None = None,
    **overrides: Any,
) -> TrainedDetector:
    """Train the teacher detector on a labeled COCO set and write its checkpoint to
    ``out`` (``dpl train-teacher``); overrides are ``teacher`` keys or whole sections."""
    from dpl_tools.engine.train_detector import train_teacher as train

    cfg = stage_config(config, "teacher", overrides, flags, sets)
    out = Path(out)
    weights = cfg["model"]["backbone_weights"]
    weights = None if weights in (None, "imagenet", "none") else weights
    check_distinct_outputs(
        {"--ann": ann, "--images": images, "--backbone-weights": weights}, {"--out": out}
    )
    try:
        _, spec, result = train(
            ann, images, out, cfg, device, seed, resume, console or Console(), allow_outside_root
        )
    finally:
        cleanup_distributed()
    return TrainedDetector(out, spec, result, cfg)


def student_init(init: str | None, cfg: Mapping[str, Any]) -> str:
    """The student's initialisation: ``init`` (teacher, imagenet or a checkpoint path),
    or the config's ``student.init``."""
    return str(init) if init not in (None, "") else str(cfg["student"]["init"])


def train_student(
    ann: str | Path,
    images: str | Path,
    pseudo: str | Path | None = None,
    out: str | Path = "runs/student.pt",
    config: ConfigLike = None,
    *,
    teacher: str | Path | None = None,
    init: str | None = None,
    unlabeled_images: str | Path | None = None,
    device: str = "auto",
    seed: int = 0,
    resume: bool = False,
    allow_outside_root: bool = False,
    console: Console | None = None,
    flags: Mapping[str, Mapping[str, Any]] | None = None,
    sets: Mapping[str, Mapping[str, Any]] | None = None,
    **overrides: Any,
) -> TrainedDetector:
    """Train the student on ground truth plus pseudo labels and write its checkpoint to
    ``out`` (``dpl train-student``). ``teacher`` is the checkpoint that made the pseudo
    labels (needed for ``init`` teacher and for soft negatives); ``init`` teacher,
    imagenet or a checkpoint path (default: ``student.init``). ``pseudo`` None with
    ``unlabeled_ratio=0``: a student of the labeled images only (the labeled-only control)."""
    from dpl_tools.engine.train_student import train_student as train

    if init in STUDENT_INITS:
        overrides = {**overrides, "init": init}
    cfg = stage_config(config, "student", overrides, flags, sets)
    init = student_init(None if init in STUDENT_INITS else init, cfg)
    if (init == "teacher" or cfg["student"]["negatives"] == "soft") and teacher is None:
        why = "--init teacher" if init == "teacher" else "soft negatives"
        raise DplError(f"{why} needs the teacher checkpoint (--teacher)")
    init_from = {"teacher": teacher, "imagenet": "imagenet"}.get(init) or Path(init)
    out = Path(out)
    check_distinct_outputs(
        {"--ann": ann, "--pseudo": pseudo, "--images": images,
         "--unlabeled-images": unlabeled_images, "--teacher": teacher,
         "--init": None if init_from == "imagenet" else init_from},
        {"--out": out},
    )  # fmt: skip
    try:
        _, spec, result, data = train(
            ann, images, pseudo, out, cfg, init_from, unlabeled_images, device, seed, resume,
            console or Console(), allow_outside_root, teacher,
        )  # fmt: skip
    finally:
        cleanup_distributed()
    return TrainedDetector(out, spec, result, cfg, data, {"init": str(init_from)}, "student")


def train_student_online(
    ann: str | Path,
    images: str | Path,
    unlabeled: str | Path,
    teacher: str | Path,
    polisher: str | Path,
    out: str | Path = "runs/student.pt",
    config: ConfigLike = None,
    *,
    unlabeled_root: str | Path | None = None,
    unlabeled_gt: str | Path | None = None,
    device: str = "auto",
    seed: int = 0,
    resume: bool = False,
    allow_outside_root: bool = False,
    console: Console | None = None,
    flags: Mapping[str, Mapping[str, Any]] | None = None,
    sets: Mapping[str, Mapping[str, Any]] | None = None,
    **overrides: Any,
) -> TrainedDetector:
    """Train the student online (``dpl train-student --online``): from ``teacher``, with
    the ``unlabeled`` images (a folder, or a COCO image list under ``unlabeled_root``)
    labelled inside the loop by its EMA teacher and the ``polisher``. Writes the student
    to ``out`` and the EMA teacher beside it (``extra["teacher"]``; with
    ``student.online_polisher`` the jointly trained polishers, ``extra["polisher"]``); with
    ``unlabeled_gt`` the pseudo labels' quality is logged as training goes."""
    from dpl_tools.engine.online_polisher import polisher_path_of
    from dpl_tools.engine.train_online import teacher_path_of
    from dpl_tools.engine.train_online import train_student_online as train

    cfg = stage_config(config, "student", {**overrides, "online": True}, flags, sets)
    out = Path(out)
    outputs = {"--out": out, "EMA teacher": teacher_path_of(out)}
    if cfg["student"]["online_polisher"]:
        outputs["trained polishers"] = polisher_path_of(out)
    check_distinct_outputs(
        {"--ann": ann, "--images": images, "--unlabeled": unlabeled,
         "--unlabeled-images": unlabeled_root, "--unlabeled-gt": unlabeled_gt,
         "--teacher": teacher, "--polisher": polisher},
        outputs,
    )  # fmt: skip
    try:
        _, spec, result, log = train(
            ann, images, unlabeled, out, cfg, teacher, polisher, unlabeled_root, unlabeled_gt,
            device, seed, resume, console or Console(), allow_outside_root,
        )  # fmt: skip
    finally:
        cleanup_distributed()
    extra = {"init": str(teacher), "teacher": str(teacher_path_of(out)), "log": log.history}
    if cfg["student"]["online_polisher"]:
        extra["polisher"] = str(polisher_path_of(out))
    return TrainedDetector(out, spec, result, cfg, None, extra, "online student")


@dataclass
class Evaluation:
    """A detector's COCO metrics on a labeled set (``metrics["AP"]`` ...) and its speed."""

    checkpoint: Path
    metrics: dict[str, float]
    summary: dict[str, Any]
    detections: list[dict[str, Any]]
    written: list[Path] = field(default_factory=list)
    ann: Path | None = None  # the labeled set it was scored on
    json_out: Path | None = None  # the metrics file, when one was asked for


def evaluate(
    model: str | Path,
    ann: str | Path,
    images: str | Path,
    *,
    batch_size: int = 4,
    workers: int = 2,
    device: str = "auto",
    score_thresh: float = 0.001,
    max_dets: int = 100,
    json_out: str | Path | None = None,
    predictions: str | Path | None = None,
    allow_outside_root: bool = False,
    console: Console | None = None,
) -> Evaluation:
    """COCO mAP of the detector checkpoint ``model`` on ``ann`` (``dpl evaluate``);
    ``json_out`` saves the metrics, ``predictions`` the detections as COCO results."""
    from dpl_tools.evaluation.detector_eval import evaluate_model
    from dpl_tools.io import write_json

    check_distinct_outputs(
        {"--ann": ann, "--images": images, "--model": model},
        {"--json": json_out, "--predictions": predictions},
    )
    result = evaluate_model(
        model, ann, images, batch_size, device, workers, score_thresh, max_dets, console,
        allow_outside_root,
    )  # fmt: skip
    written = []
    if json_out:
        write_json(json_out, {**result.metrics, **result.summary()}, indent=2)
        written.append(Path(json_out))
    if predictions:
        write_json(predictions, result.detections)
        written.append(Path(predictions))
    return Evaluation(Path(model), result.metrics, result.summary(), result.detections, written,
                      Path(ann), Path(json_out) if json_out else None)  # fmt: skip
