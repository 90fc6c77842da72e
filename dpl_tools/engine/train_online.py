"""Train a student online (``dpl train-student --online``): the mean teacher and the
polishers label the unlabeled images inside the loop (``dpl_tools.engine.online``); the
rest (SGD, AMP, DDP, progress, checkpoints, resume) is the offline student's loop."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from dpl_tools.config import plain
from dpl_tools.data.augment import training_augment
from dpl_tools.data.coco import load_coco
from dpl_tools.data.detection import DetectionDataset
from dpl_tools.data.image_list import load_image_list
from dpl_tools.data.student_data import StudentDataset, collate_student
from dpl_tools.engine.ema import ModelEMA
from dpl_tools.engine.loop import EMAHook, Hook, TrainLoop, TrainResult
from dpl_tools.engine.online import (
    OnlineImages,
    OnlineLabeler,
    OnlineLog,
    OnlineQuality,
    online_losses,
)
from dpl_tools.engine.online_eval import EvaluationSlice, slice_records
from dpl_tools.engine.online_polisher import OnlinePolisher, SaveOnlinePolisher, polisher_path_of
from dpl_tools.engine.polish_settings import applied_polisher
from dpl_tools.engine.setup import load_train_coco, setup_training
from dpl_tools.engine.train_detector import start_detector, train_detector
from dpl_tools.engine.train_student import (
    _resume_student,
    build_student,
    requested_student_model,
)
from dpl_tools.errors import DplError
from dpl_tools.io import sha256_file
from dpl_tools.models.checkpoint import DetectorSpec, save_detector
from dpl_tools.models.polisher import load_polisher
from dpl_tools.models.student_criterion import make_student, student_losses, supervision


def teacher_path_of(out: str | Path) -> Path:
    """Where the EMA teacher of an online student ``out`` is saved."""
    out = Path(out)
    return out.with_name(f"{out.stem}.teacher{out.suffix or '.pt'}")


class SaveEMATeacher(Hook):
    """At the end of training (rank 0), save the EMA teacher as a detector checkpoint."""

    def __init__(self, ema: ModelEMA, spec: DetectorSpec, out: Path, log: OnlineLog) -> None:
        self.ema, self.spec, self.out, self.log = ema, spec, out, log

    def after_train(self, loop: TrainLoop) -> None:
        if loop.finished and loop.dist.is_main:
            self.spec.extra["online_log"] = self.log.history
            save_detector(self.out, self.ema.module, self.spec, loop.train_state())


def train_student_online(
    ann: str | Path,
    images_dir: str | Path,
    unlabeled: str | Path,
    out: str | Path,
    config: dict[str, Any],
    teacher: str | Path,
    polisher: str | Path,
    unlabeled_root: str | Path | None = None,
    unlabeled_gt: str | Path | None = None,
    device: str = "auto",
    seed: int = 0,
    resume: bool = False,
    console: Console | None = None,
    allow_outside_root: bool = False,
    hooks: Sequence[Hook] = (),
) -> tuple[Any, DetectorSpec, TrainResult, OnlineLog]:
    """Train a student from ``teacher`` on ``ann`` plus the ``unlabeled`` images (a folder
    or COCO image list under ``unlabeled_root``) labelled online by its EMA teacher and the
    ``polisher``; write the student to ``out`` and the EMA teacher beside it (with
    ``student.online_polisher``, the jointly trained polishers too; ``hooks``: more
    training hooks, run after the online ones)."""
    console = console or Console()
    out, scfg = Path(out), config["student"]
    if scfg["negatives"] == "soft":
        raise DplError("--online takes --negatives ignore or hard (soft needs a fixed teacher)")
    run = setup_training(scfg, device, seed)
    if str(scfg["init"]) != "teacher" and run.dist.is_main:  # a mean teacher needs a teacher
        console.print(f"[bold yellow]note:[/] --online starts from --teacher {teacher} "
                      f"(student.init {scfg['init']} is for the offline student)")  # fmt: skip
    coco = load_train_coco(ann, images_dir, console, run.dist.is_main, allow_outside_root)
    records = load_image_list(unlabeled, unlabeled_root, allow_outside_root)
    if not records and scfg["unlabeled_ratio"] > 0:
        raise DplError(f"{unlabeled}: no unlabeled images to learn from")
    start = start_detector(
        out, resume, seed, run.dist.is_main, console, requested_student_model(teacher, config),
        lambda: build_student(teacher, coco.categories, ann, config),
        lambda ckpt: _resume_student(ckpt, coco.categories, out, Path(ann), config),
        f"--teacher {teacher}: ", "starting from the teacher",
    )  # fmt: skip
    model, spec = start.model, start.spec
    spec.extra.update(online=True, config=plain(config), polisher=str(polisher))
    make_student(model)
    model.to(run.device)
    ema = ModelEMA(model, scfg["ema_momentum"])
    refiner = load_polisher(polisher, teacher_sha=sha256_file(teacher), device=run.device)
    applied = applied_polisher(config["polish"], refiner, polisher)
    if run.dist.is_main:
        applied.announce(console)
    gt = load_coco(unlabeled_gt) if unlabeled_gt is not None else None
    truth = gt.truth_by_file() if gt is not None else None
    joint = None
    if scfg["online_polisher"]:  # the polishers train on, and their EMA copy labels
        joint = OnlinePolisher(refiner, ema.module, config["polisher"],
                               scfg["online_polisher_lr"], run.dist, seed)  # fmt: skip
    labeler = OnlineLabeler(
        ema, joint.labeler if joint else refiner, applied.settings, spec.label_to_cat,
        coco.cat_to_label,
        supervision(scfg["pseudo_view"], scfg["disentangle"]),
        scfg["negatives"], training_augment(scfg, "student", "pseudo_augment"),
        OnlineQuality(truth) if truth is not None else None,
    )  # fmt: skip
    labeled = DetectionDataset(coco, images_dir, training_augment(scfg, "student"))
    dataset = StudentDataset(labeled, OnlineImages(list(records)), scfg["unlabeled_ratio"])
    evaluation = None
    if gt is not None and scfg["online_eval_images"] > 0:
        chosen = slice_records(list(records), gt, scfg["online_eval_images"], seed)
        evaluation = EvaluationSlice(chosen, gt, applied.settings, spec.label_to_cat,
                                     scfg["online_eval_recall"])  # fmt: skip
    log = OnlineLog(labeler, scfg["online_log_every"], console, spec.extra, evaluation, joint)
    teacher_spec = replace(spec, kind="teacher", extra={**spec.extra, "ema_of": str(out)})
    saver = SaveEMATeacher(ema, teacher_spec, teacher_path_of(out), log)
    online_hooks: list[Hook] = [EMAHook(ema, model), log, saver]
    if joint is not None:  # saved after the EMA teacher it is tied to
        online_hooks += [joint, SaveOnlinePolisher(
            joint, refiner, teacher_path_of(out), polisher_path_of(out),
            {"online_of": str(out), "started_from": str(polisher), "ann": str(ann),
             "lr": scfg["online_polisher_lr"]},
        )]  # fmt: skip
    result = train_detector(
        start, dataset, run, out, seed, console, "train-student --online",
        online_losses(student_losses(scfg["unlabeled_weight"]), labeler, joint),
        collate_student, [*online_hooks, *hooks],
    )  # fmt: skip
    return model, spec, result, log
