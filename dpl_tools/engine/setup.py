"""What every training stage does first: device, process group, settings, labeled COCO set,
the checkpoint a resumed run continues, and the check that two files name the same classes.

The teacher (``train_detector``), the polishers (``train_polisher``) and the student
(``train_student``) share one skeleton: ``setup_training``, ``load_train_coco``,
``resume_checkpoint``, reseed, build or resume the model, then the training loop
(``dpl_tools.engine.loop.train``); so the three start the same way and fail with the same
one-line errors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from dpl_tools.data.coco import CocoData, load_coco
from dpl_tools.engine.loop import TrainConfig
from dpl_tools.errors import DplError
from dpl_tools.runtime import DistInfo, init_distributed, resolve_device


@dataclass
class TrainSetup:
    """Where and how a stage trains: its device, its rank in the process group, its loop
    settings."""

    device: torch.device
    dist: DistInfo
    cfg: TrainConfig
    train_crop: int | None = None  # a detector's random training window (px), None: whole
    min_visible: float = 0.3  # a box cropped to less of its area leaves the loss


def setup_training(section: dict[str, Any], device: str, seed: int) -> TrainSetup:
    """Resolve ``device``, join the process group under torchrun (pinning this rank's GPU)
    and read the loop settings of a config section (with ``seed``) and, for a detector,
    its training crop."""
    torch_device = resolve_device(device)
    dist = init_distributed(torch_device)
    if dist.enabled and torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    cfg = TrainConfig.from_section(section, seed=seed)
    crop = section.get("train_crop")
    return TrainSetup(torch_device, dist, cfg, crop, section.get("aug_min_visible", 0.3))


def resume_checkpoint(
    out: str | Path,
    resume: bool,
    is_main: bool,
    console: Console,
    read: Callable[[Path], dict[str, Any]] | None = None,
    fresh_note: str = "starting from scratch",
) -> dict | None:
    """With ``resume``, the checkpoint of ``out`` to continue (``find_resume_checkpoint``,
    read with ``read``); None for a fresh run, said on the main process when a resume
    found nothing."""
    from dpl_tools.engine.loop import find_resume_checkpoint

    ckpt = find_resume_checkpoint(out, read) if resume else None
    if resume and ckpt is None and is_main:
        console.print(f"no checkpoint to resume at {out}; {fresh_note}")
    return ckpt


def load_train_coco(
    ann: str | Path,
    images_dir: str | Path,
    console: Console | None,
    verbose: bool = True,
    allow_outside_root: bool = False,
) -> CocoData:
    """The labeled COCO set a stage trains on: its load warnings printed (when ``verbose``,
    i.e. on rank 0), and a DplError when it has no images or no boxes. File names leaving
    ``images_dir`` are refused unless ``allow_outside_root``."""
    coco = load_coco(ann, images_dir, allow_outside_root=allow_outside_root)
    if verbose:
        console = console or Console()
        for line in coco.report.lines():
            console.print(f"[yellow]warning:[/] {line}", highlight=False)
    if not coco.images:
        raise DplError(f"{ann}: no labeled images to train on (are the images in {images_dir}?)")
    if not coco.annotations:
        raise DplError(f"{ann}: no boxes to train on")
    return coco


def check_categories(
    path: str | Path,
    categories: list[dict],
    reference: str | Path,
    reference_categories: list[dict],
    what: str = "its",
    consequence: str = "",
) -> None:
    """``path``'s classes (COCO category dicts) must be ``reference``'s, same ids in the
    same order (label k is category k-1); else a DplError naming both files."""
    if [c["id"] for c in categories] != [c["id"] for c in reference_categories]:
        tail = f"; {consequence}" if consequence else ""
        raise DplError(f"{path}: {what} classes differ from those of {reference}{tail}")
