"""The teacher's training on labeled images, and the detector checkpoints of a run.

The training loop itself (SGD with warm-up and step decay, gradient clipping, AMP on GPU,
DDP under torchrun, progress bar, periodic checkpoints, resume) is ``dpl_tools.engine.loop``;
the teacher runs it with torchvision's Faster R-CNN losses, the student
(``train_student``) with its own. Resuming restores weights, optimizer, RNG and the
position in the data stream, so a resumed CPU run ends with the same weights as an
uninterrupted one (with ``workers=0``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from dpl_tools.config import plain
from dpl_tools.data.augment import training_augment
from dpl_tools.data.detection import DetectionDataset
from dpl_tools.engine.loop import (
    Hook,
    SaveFn,
    TrainConfig,
    TrainResult,
    find_resume_checkpoint,
    last_checkpoint_path,
    train,
)
from dpl_tools.engine.setup import check_categories, load_train_coco, setup_training
from dpl_tools.models.checkpoint import (
    DetectorSpec,
    check_same_model,
    detector_from_checkpoint,
    fresh_detector,
    requested_model,
    save_detector,
    unwrap,
)
from dpl_tools.runtime import seed_everything

__all__ = ["TrainConfig", "TrainResult", "checkpoint_saver", "detector_losses", "train_teacher"]


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
    dist = run.dist
    coco = load_train_coco(ann, images_dir, console, dist.is_main, allow_outside_root)

    resume_ckpt = find_resume_checkpoint(out) if resume else None
    if resume and resume_ckpt is None and dist.is_main:
        console.print(f"no checkpoint to resume at {out}; starting from scratch")
    seed_everything(seed)
    if resume_ckpt is not None:
        check_same_model(resume_ckpt, requested_model(mcfg), out)
        model, spec = detector_from_checkpoint(resume_ckpt, out, tcfg["multiscale"])
        check_categories(
            out, spec.categories, ann, coco.categories, "the checkpoint's", "cannot resume"
        )
    else:
        model, spec = fresh_detector(
            mcfg, coco.categories, "teacher", tcfg["multiscale"], train_ann=str(ann)
        )
    spec.extra["config"] = plain(config)
    seed_everything(seed + dist.rank)
    dataset = DetectionDataset(coco, images_dir, training_augment(tcfg, "teacher"))

    save = checkpoint_saver(out, spec, seed)
    result = train(
        model,
        dataset,
        run.cfg,
        run.device,
        dist,
        loss_fn=detector_losses,
        save=save,
        resume_state=resume_ckpt["train_state"] if resume_ckpt else None,
        description="train-teacher",
        out=out,
        console=console,
        hooks=hooks,
    )
    return model, spec, result
