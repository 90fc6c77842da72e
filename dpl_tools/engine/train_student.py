"""The student: a detector trained on labeled ground truth plus (polished) pseudo labels.

Each iteration takes a batch of labeled images and, per labeled image, on average
``unlabeled_ratio`` pseudo-labeled images; the loss is
``L_labeled + unlabeled_weight * L_unlabeled`` (two forward passes, so the weight applies
per image set). On pseudo-labeled images the supervision is the paper's disentangled one
(``dpl_tools.models.student``): RPN and RoI classification learn from the classification
pseudo labels, RoI box regression only from the regression pseudo labels. Ablations:
``pseudo_view="raw"`` (unpolished teacher boxes and labels) and ``disentangle=False``
(polished boxes and labels for every loss). The training loop (SGD, warm-up, AMP, DDP,
progress, checkpoints, resume) is ``train_detector``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from dpl_tools.config import register_defaults
from dpl_tools.data.coco import load_coco
from dpl_tools.data.detection import DetectionDataset
from dpl_tools.data.pseudo_labels import read_pseudo_labels
from dpl_tools.data.pseudo_targets import VIEWS, pseudo_targets
from dpl_tools.data.student_data import (
    PseudoLabeledDataset,
    StudentDataset,
    check_pseudo_categories,
    collate_student,
    missing_images,
)
from dpl_tools.engine.train_detector import (
    LossFn,
    TrainConfig,
    TrainResult,
    checkpoint_saver,
    find_resume_checkpoint,
    train_detector,
)
from dpl_tools.errors import DplError
from dpl_tools.io import sha256_file
from dpl_tools.models.checkpoint import (
    DetectorSpec,
    detector_from_checkpoint,
    read_checkpoint,
)
from dpl_tools.models.detector import build_detector, multiscale_sizes
from dpl_tools.models.student import make_disentangled
from dpl_tools.runtime import init_distributed, resolve_device, seed_everything

register_defaults(
    "student",
    {
        "iters": 400,
        "batch_size": 2,  # labeled images per iteration per process
        "unlabeled_ratio": 1.0,  # pseudo-labeled images per labeled image in a batch
        "unlabeled_weight": 1.0,  # loss = L_labeled + unlabeled_weight * L_unlabeled
        "pseudo_view": "polished",  # or "raw": unpolished teacher boxes and labels
        "disentangle": True,  # False: polished boxes and labels for every loss
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 0.0001,
        "warmup_iters": 100,
        "warmup_factor": 0.001,
        "lr_steps": [0.667, 0.889],
        "gamma": 0.1,
        "clip_grad_norm": 10.0,
        "multiscale": [0.8, 0.9, 1.0, 1.1, 1.2],
        "hflip": True,
        "workers": 2,
        "checkpoint_every": 100,
    },
)


@dataclass
class StudentData:
    """What the student trains on: counts for the report."""

    labeled_images: int
    unlabeled_images: int
    cls_boxes: int
    reg_boxes: int


def student_losses(unlabeled_weight: float = 1.0) -> LossFn:
    """Per-batch loss: Faster R-CNN losses of the labeled images plus ``unlabeled_weight``
    times those of the pseudo-labeled images (targets marked ``pseudo``)."""

    def loss_fn(model: nn.Module, images: list, targets: list) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        for name, weight, pseudo in (
            ("labeled", 1.0, False),
            ("unlabeled", unlabeled_weight, True),
        ):
            idx = [i for i, t in enumerate(targets) if bool(t.get("pseudo", False)) == pseudo]
            if not idx or (pseudo and weight == 0):
                continue
            part = model(
                [images[i] for i in idx],
                [{k: v for k, v in targets[i].items() if k != "pseudo"} for i in idx],
            )
            losses.update({f"{name}_{k}": weight * v for k, v in part.items()})
        return losses

    return loss_fn


def _check_categories(spec: DetectorSpec, categories: list[dict], what: str, ann: Path) -> None:
    if [c["id"] for c in spec.categories] != [c["id"] for c in categories]:
        raise DplError(f"{what}: its classes differ from {ann}'s categories")


def build_student(
    init: str | Path,
    categories: list[dict],
    ann: Path,
    config: dict[str, Any],
) -> tuple[nn.Module, DetectorSpec]:
    """A student detector initialised from a teacher checkpoint (``init`` a path) or built
    fresh with the config's backbone weights (``init="imagenet"``)."""
    mcfg, scfg = config["model"], config["student"]
    if str(init) == "imagenet":
        spec = DetectorSpec(
            arch=mcfg["arch"],
            categories=categories,
            min_size=int(mcfg["min_size"]),
            max_size=int(mcfg["max_size"]),
            kind="student",
            extra={"backbone_weights": str(mcfg["backbone_weights"]), "init": "imagenet"},
        )
        model = build_detector(
            spec.arch,
            spec.num_classes,
            str(mcfg["backbone_weights"]),
            multiscale_sizes(spec.min_size, scfg.get("multiscale")),
            spec.max_size,
            **dict(mcfg.get("detector_kwargs") or {}),
        )
        return model, spec
    model, teacher = detector_from_checkpoint(read_checkpoint(init), init, scfg.get("multiscale"))
    _check_categories(teacher, categories, str(init), ann)
    spec = DetectorSpec(
        arch=teacher.arch,
        categories=categories,
        min_size=teacher.min_size,
        max_size=teacher.max_size,
        kind="student",
        extra={"init": str(init), "init_sha256": sha256_file(init)},
    )
    return model, spec


def _resume_student(ckpt: dict, categories: list[dict], out: Path, ann: Path, config: dict):
    model, spec = detector_from_checkpoint(ckpt, out, config["student"].get("multiscale"))
    if spec.kind != "student":
        raise DplError(f"{out}: a {spec.kind} checkpoint, not a student; cannot resume")
    _check_categories(spec, categories, str(out), ann)
    return model, spec


def load_student_data(
    ann: str | Path,
    images_dir: str | Path,
    pseudo: str | Path,
    unlabeled_images: str | Path | None,
    scfg: dict[str, Any],
    console: Console | None = None,
    verbose: bool = True,
) -> tuple[StudentDataset, StudentData]:
    """The labeled set (ground truth) and the pseudo-labeled set (the configured view),
    paired for training; checks classes and image folders (one-line DplErrors)."""
    console = console or Console()
    view, disentangle = str(scfg["pseudo_view"]), bool(scfg["disentangle"])
    if view not in VIEWS:
        raise DplError(f"unknown --pseudo-view {view!r} (choose from {', '.join(VIEWS)})")
    coco = load_coco(ann, images_dir)
    if verbose:
        for line in coco.report.lines():
            console.print(f"[yellow]warning:[/] {line}", highlight=False)
    if not coco.images:
        raise DplError(f"{ann}: no labeled images to train on (are the images in {images_dir}?)")
    if not coco.annotations:
        raise DplError(f"{ann}: no boxes to train on")

    table, meta = read_pseudo_labels(pseudo)
    items = pseudo_targets(table, view=view, disentangle=disentangle)
    check_pseudo_categories(meta, items, coco, pseudo)
    unlabeled_dir = Path(unlabeled_images or images_dir)
    missing = missing_images(items, unlabeled_dir)
    if items and len(missing) == len(items):
        raise DplError(
            f"{unlabeled_dir}: none of the {len(items)} pseudo-labeled images of {pseudo} is "
            f"there (e.g. {missing[0]}); pass the polished images' folder as --unlabeled-images"
        )
    if missing:
        if verbose:
            console.print(
                f"[yellow]warning:[/] {len(missing)} pseudo-labeled image(s) missing from "
                f"{unlabeled_dir} (skipped), e.g. {missing[0]}",
                highlight=False,
            )
        gone = set(missing)
        items = [t for t in items if t.file_name not in gone]
    if not items and float(scfg["unlabeled_ratio"]) > 0:
        raise DplError(f"{pseudo}: no processed unlabeled images to learn from")

    hflip_on = bool(scfg.get("hflip", True))
    labeled = DetectionDataset(coco, images_dir, train=hflip_on)
    unlabeled = PseudoLabeledDataset(
        items, unlabeled_dir, coco.cat_to_label, disentangled=disentangle and view != "raw",
        train=hflip_on,
    )  # fmt: skip
    dataset = StudentDataset(labeled, unlabeled, float(scfg["unlabeled_ratio"]))
    stats = StudentData(
        labeled_images=len(labeled),
        unlabeled_images=len(unlabeled),
        cls_boxes=sum(len(t["boxes"]) for t in unlabeled.targets),
        reg_boxes=sum(len(t.get("reg_boxes", t["boxes"])) for t in unlabeled.targets),
    )
    return dataset, stats


def train_student(
    ann: str | Path,
    images_dir: str | Path,
    pseudo: str | Path,
    out: str | Path,
    config: dict[str, Any],
    init: str | Path,
    unlabeled_images: str | Path | None = None,
    device: str = "auto",
    seed: int = 0,
    resume: bool = False,
    console: Console | None = None,
) -> tuple[nn.Module, DetectorSpec, TrainResult, StudentData]:
    """Train a student on ``ann`` (ground truth) + ``pseudo`` (pseudo labels) and save it
    to ``out`` (kind ``student``, loadable with ``load_detector``).

    ``init`` is a teacher checkpoint path or ``"imagenet"``; ``config`` has ``model`` and
    ``student`` sections. Returns the model (eval mode), spec, run numbers and data counts.
    """
    console = console or Console()
    ann, out = Path(ann), Path(out)
    torch_device = resolve_device(device)
    dist = init_distributed(torch_device)
    scfg = config["student"]
    cfg = TrainConfig.from_section(scfg, seed=seed)
    dataset, stats = load_student_data(
        ann, images_dir, pseudo, unlabeled_images, scfg, console, verbose=dist.is_main
    )
    categories = dataset.labeled.coco.categories

    resume_ckpt = find_resume_checkpoint(out) if resume else None
    if resume and resume_ckpt is None and dist.is_main:
        console.print(f"no checkpoint to resume at {out}; starting from the initial weights")
    seed_everything(seed)
    if resume_ckpt is not None:
        model, spec = _resume_student(resume_ckpt, categories, out, ann, config)
    else:
        model, spec = build_student(init, categories, ann, config)
        spec.extra.update(
            train_ann=str(ann),
            pseudo_labels=str(pseudo),
            pseudo_view=str(scfg["pseudo_view"]),
            disentangle=bool(scfg["disentangle"]),
            unlabeled_ratio=float(scfg["unlabeled_ratio"]),
            unlabeled_weight=float(scfg["unlabeled_weight"]),
            config=config,
        )
        if Path(pseudo).is_file():
            spec.extra["pseudo_labels_sha256"] = sha256_file(pseudo)
    make_disentangled(model)
    seed_everything(seed + dist.rank)

    save = checkpoint_saver(out, spec, seed)
    result = train_detector(
        model,
        dataset,
        cfg,
        torch_device,
        dist,
        loss_fn=student_losses(float(scfg["unlabeled_weight"])),
        collate_fn=collate_student,
        save=save,
        resume_state=resume_ckpt["train_state"] if resume_ckpt else None,
        description="train-student",
        console=console,
    )
    return model, spec, result, stats
