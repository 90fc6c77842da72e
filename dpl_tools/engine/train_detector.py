"""The teacher's training on labeled images, and the detector checkpoints of a run.

The training loop itself (SGD with warm-up and step decay, gradient clipping, AMP on GPU,
DDP under torchrun, progress bar, periodic checkpoints, resume) is ``dpl_tools.engine.loop``;
the teacher runs it with torchvision's Faster R-CNN losses, the student
(``train_student``) with its own. Resuming restores weights, optimizer, RNG and the
position in the data stream, so a resumed CPU run ends with the same weights as an
uninterrupted one (with ``workers=0``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn
from torch.utils.data import Dataset

from dpl_tools.config import plain
from dpl_tools.data.augment import training_augment
from dpl_tools.data.detection import DetectionDataset
from dpl_tools.engine.loop import (
    Hook,
    SaveFn,
    TrainConfig,
    TrainResult,
    last_checkpoint_path,
    train,
)
from dpl_tools.engine.setup import (
    TrainSetup,
    check_categories,
    load_train_coco,
    resume_checkpoint,
    setup_training,
)
from dpl_tools.models.checkpoint import (
    DetectorSpec,
    check_same_model,
    detector_from_checkpoint,
    fresh_detector,
    requested_model,
    save_detector,
    unwrap,
)
from dpl_tools.models.transform import set_train_crop
from dpl_tools.runtime import seed_everything

__all__ = [
    "DetectorStart",
    "TrainConfig",
    "TrainResult",
    "checkpoint_saver",
    "detector_losses",
    "start_detector",
    "train_detector",
    "train_teacher",
]


def detector_losses(model: nn.Module, images: list, targets: list) -> dict[str, torch.Tensor]:
    """The default loss: torchvision's Faster R-CNN losses (RPN + RoI head)."""
    return model(images, targets)


def checkpoint_saver(out: str | Path, spec: DetectorSpec, seed: int) -> SaveFn:
    """The ``save`` callback of a detector's training loop: periodic checkpoints go to
    ``<out stem>.last.pt``, the final one to ``out`` (and the periodic one is removed)."""

    def save(net: nn.Module, state: dict, final: bool) -> None:
        state = {**state, "seed": seed}
        save_detector(out if final else last_checkpoint_path(out), unwrap(net), spec, state)
        if final:
            last_checkpoint_path(out).unlink(missing_ok=True)

    return save


@dataclass
class DetectorStart:
    """The detector a training stage starts from, its spec, and the training state of the
    periodic checkpoint it continues (None: a fresh run)."""

    model: nn.Module
    spec: DetectorSpec
    resume_state: dict | None


def start_detector(
    out: Path,
    resume: bool,
    seed: int,
    is_main: bool,
    console: Console,
    requested: dict[str, Any],
    fresh: Callable[[], tuple[nn.Module, DetectorSpec]],
    resumed: Callable[[dict], tuple[nn.Module, DetectorSpec]],
    source: str = "model.",
    fresh_note: str = "starting from scratch",
) -> DetectorStart:
    """The first half of the teacher's and the student's training: with ``resume``, the
    periodic checkpoint of ``out`` (the same model as ``requested``, else a one-line
    error) rebuilt by ``resumed``; otherwise ``fresh()``. Seeded like an uninterrupted run."""
    ckpt = resume_checkpoint(out, resume, is_main, console, fresh_note=fresh_note)
    seed_everything(seed)
    if ckpt is not None:
        check_same_model(ckpt, requested, out, source)
        model, spec = resumed(ckpt)
    else:
        model, spec = fresh()
    return DetectorStart(model, spec, ckpt["train_state"] if ckpt else None)


def train_detector(
    start: DetectorStart,
    dataset: Dataset,
    run: TrainSetup,
    out: Path,
    seed: int,
    console: Console,
    description: str,
    loss_fn: Callable = detector_losses,
    collate_fn: Callable | None = None,
    hooks: Sequence[Hook] = (),
) -> TrainResult:
    """The second half: ``train`` the started detector on ``dataset`` (each rank seeded
    apart; on random ``train_crop`` windows when the section sets one), with periodic
    checkpoints beside ``out`` and the final one at ``out``."""
    seed_everything(seed + run.dist.rank)
    if run.train_crop:
        set_train_crop(start.model, run.train_crop, run.min_visible)
    more = {"collate_fn": collate_fn} if collate_fn is not None else {}
    return train(
        start.model,
        dataset,
        run.cfg,
        run.device,
        run.dist,
        loss_fn=loss_fn,
        save=checkpoint_saver(out, start.spec, seed),
        resume_state=start.resume_state,
        description=description,
        out=out,
        console=console,
        hooks=hooks,
        **more,
    )


def train_teacher(
    ann: str | Path,
    images_dir: str | Path,
    out: str | Path,
    config: dict[str, Any],
    device: str = "auto",
    seed: int = 0,
    resume: bool = False,
    console: Console | None = None,
    allow_outside_root: bool = False,
    hooks: Sequence[Hook] = (),
) -> tuple[nn.Module, DetectorSpec, TrainResult]:
    """Train a teacher detector on a labeled COCO set and save it to ``out``; returns the
    trained model (eval mode), its spec and the run's numbers.

    ``config`` has ``model`` and ``teacher`` sections (see ``dpl_tools.config``); ``hooks``
    run inside the training loop (``dpl_tools.engine.loop.Hook``).
    """
    console = console or Console()
    mcfg, tcfg = config["model"], config["teacher"]
    run = setup_training(tcfg, device, seed)
    coco = load_train_coco(ann, images_dir, console, run.dist.is_main, allow_outside_root)

    def resumed(ckpt: dict) -> tuple[nn.Module, DetectorSpec]:
        model, spec = detector_from_checkpoint(ckpt, out, tcfg["multiscale"])
        check_categories(
            out, spec.categories, ann, coco.categories, "the checkpoint's", "cannot resume"
        )
        return model, spec

    def fresh() -> tuple[nn.Module, DetectorSpec]:
        return fresh_detector(
            mcfg, coco.categories, "teacher", tcfg["multiscale"], train_ann=str(ann)
        )

    start = start_detector(
        Path(out), resume, seed, run.dist.is_main, console, requested_model(mcfg), fresh, resumed
    )
    start.spec.extra["config"] = plain(config)
    dataset = DetectionDataset(coco, images_dir, training_augment(tcfg, "teacher"))
    result = train_detector(
        start, dataset, run, Path(out), seed, console, "train-teacher", hooks=hooks
    )
    return start.model, start.spec, result
