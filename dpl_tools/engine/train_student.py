"""The student: a detector trained on labeled ground truth plus (polished) pseudo labels.

Each iteration takes a batch of labeled images and, per labeled image, on average
``unlabeled_ratio`` pseudo-labeled images; the loss is
``L_labeled + unlabeled_weight * L_unlabeled`` (two forward passes, so the weight applies
per image set). On pseudo-labeled images the supervision is the paper's disentangled one:
RPN and RoI classification learn from the classification pseudo labels, RoI box
regression only from the regression pseudo labels; the loss, its targets and views are
``dpl_tools.models.student_criterion``'s (one place). Ablations:
``pseudo_view="raw"`` (unpolished teacher boxes and labels), ``"reg-only"`` / ``"cls-only"``
(only one of the two sets polished) and ``disentangle=False`` (polished boxes and labels for
every loss). ``negatives`` says what the unlabeled images' background is: ``hard``,
``ignore`` (the teacher boxes not kept for classification are ignore regions) or ``soft``
(weighted by the frozen teacher's background probability; the teacher is loaded). The
training loop (SGD, warm-up, AMP, DDP, progress, checkpoints, resume) is
``dpl_tools.engine.loop``'s, as for the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from torch import nn

from dpl_tools.config import check_together, plain
from dpl_tools.data.augment import training_augment
from dpl_tools.data.coco import check_inside_root
from dpl_tools.data.detection import DetectionDataset
from dpl_tools.data.image_sizes import size_mismatches
from dpl_tools.data.pseudo_labels import read_pseudo_labels
from dpl_tools.data.pseudo_targets import pseudo_images
from dpl_tools.data.student_data import (
    PseudoLabeledDataset,
    StudentDataset,
    check_pseudo_categories,
    collate_student,
    missing_images,
)
from dpl_tools.engine.loop import TrainResult
from dpl_tools.engine.setup import check_categories, load_train_coco, setup_training
from dpl_tools.engine.train_detector import start_detector, train_detector
from dpl_tools.errors import DplError
from dpl_tools.io import sha256_file
from dpl_tools.models.checkpoint import (
    DetectorSpec,
    detector_from_checkpoint,
    fresh_detector,
    read_checkpoint,
    requested_model,
    saved_model,
)
from dpl_tools.models.student_criterion import (
    IGNORE_KEY,
    NEGATIVES,
    VIEWS,
    TeacherBackground,
    make_student,
    student_losses,
    student_target,
    supervision,
    used_categories,
)


@dataclass
class StudentData:
    """What the student trains on: counts for the report."""

    labeled_images: int
    unlabeled_images: int
    cls_boxes: int
    reg_boxes: int
    dropped_rows: int = 0  # pseudo-label rows left out as unusable (see ``student_target``)
    ignore_boxes: int = 0  # ignore regions of the unlabeled images (negatives="ignore")


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
        return fresh_detector(mcfg, categories, "student", scfg["multiscale"], init="imagenet")
    # the whole backbone trains when fine-tuning a teacher (its stem froze on ImageNet)
    model, teacher = detector_from_checkpoint(
        read_checkpoint(init), init, scfg["multiscale"], frozen_stem=False
    )
    check_categories(init, teacher.categories, ann, categories)
    spec = DetectorSpec(
        arch=teacher.arch,
        categories=categories,
        min_size=teacher.min_size,
        max_size=teacher.max_size,
        kind="student",
        extra={"init": str(init), "init_sha256": sha256_file(init)},
    )
    return model, spec


def requested_student_model(init: str | Path, config: dict[str, Any]) -> dict[str, Any]:
    """The detector ``build_student`` would make from ``init``, in ``saved_model``'s form
    (to refuse resuming a student of another architecture)."""
    if str(init) == "imagenet":
        return requested_model(config["model"])
    if not Path(init).is_file():
        return {}
    return {**saved_model(read_checkpoint(init), init), "backbone_weights": None}


def _resume_student(ckpt: dict, categories: list[dict], out: Path, ann: Path, config: dict):
    model, spec = detector_from_checkpoint(ckpt, out, config["student"]["multiscale"])
    if spec.kind != "student":
        raise DplError(f"{out}: a {spec.kind} checkpoint, not a student; cannot resume")
    check_categories(out, spec.categories, ann, categories, consequence="cannot resume")
    return model, spec


def _images_on_disk(
    items: list, pseudo: Path, unlabeled_dir: Path, console: Console, verbose: bool
) -> list:
    """The pseudo-labeled images still usable in ``unlabeled_dir``: those missing, or whose
    size changed since polish (their boxes would land wrong), are left out with a warning;
    none there at all is a DplError (the wrong folder)."""
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
    resized = size_mismatches(unlabeled_dir, [(t.file_name, t.width, t.height) for t in items])
    if resized:
        if verbose:
            console.print(
                f"[yellow]warning:[/] {len(resized)} pseudo-labeled image(s) in {unlabeled_dir} "
                f"no longer have the size polish saw (left out; polish them again), e.g. "
                f"{resized[0]}",
                highlight=False,
            )
        changed = set(resized)
        items = [t for t in items if t.file_name not in changed]
    return items


def load_student_data(
    ann: str | Path,
    images_dir: str | Path,
    pseudo: str | Path | None,
    unlabeled_images: str | Path | None,
    scfg: dict[str, Any],
    console: Console | None = None,
    verbose: bool = True,
    allow_outside_root: bool = False,
) -> tuple[StudentDataset, StudentData]:
    """The labeled set (ground truth) and the pseudo-labeled set (the configured view),
    paired for training; checks classes and image folders (one-line DplErrors). Image
    files whose size changed since polish are left out (their boxes would land wrong).
    ``pseudo`` None: the labeled images only (``unlabeled_ratio`` must be 0)."""
    console = console or Console()
    view, disentangle = scfg["pseudo_view"], scfg["disentangle"]
    if view not in VIEWS:
        raise DplError(f"unknown --pseudo-view {view!r} (choose from {', '.join(VIEWS)})")
    if scfg["negatives"] not in NEGATIVES:
        raise DplError(
            f"unknown --negatives {scfg['negatives']!r} (choose from {', '.join(NEGATIVES)})"
        )
    coco = load_train_coco(ann, images_dir, console, verbose, allow_outside_root)
    if pseudo is None:  # a labeled-only student (--unlabeled-ratio 0 without --pseudo)
        if scfg["unlabeled_ratio"] > 0:
            raise DplError("no pseudo labels: pass --pseudo, or --unlabeled-ratio 0 for a "
                           "student of the labeled images only")  # fmt: skip
        labeled = DetectionDataset(coco, images_dir, training_augment(scfg, "student"))
        none = PseudoLabeledDataset([], [], images_dir)
        return StudentDataset(labeled, none, 0.0), StudentData(len(labeled), 0, 0, 0)
    table, meta = read_pseudo_labels(pseudo)
    items = pseudo_images(table)
    chosen = supervision(view, disentangle)
    check_pseudo_categories(meta, set().union(*(used_categories(t, chosen) for t in items)),
                            coco, pseudo)  # fmt: skip
    unlabeled_dir = Path(unlabeled_images or images_dir)
    names = [(None, t.file_name) for t in items]
    check_inside_root(Path(pseudo), names, unlabeled_dir, allow_outside_root)
    items = _images_on_disk(items, Path(pseudo), unlabeled_dir, console, verbose)
    if not items and scfg["unlabeled_ratio"] > 0:
        raise DplError(f"{pseudo}: no processed unlabeled images to learn from")

    labeled = DetectionDataset(coco, images_dir, training_augment(scfg, "student"))
    negatives = scfg["negatives"]
    built = [student_target(t, chosen, coco.cat_to_label, negatives) for t in items]
    unlabeled = PseudoLabeledDataset(
        items, [t for t, _ in built], unlabeled_dir,
        training_augment(scfg, "student", "pseudo_augment"),
        mixup=scfg["mixup"], mosaic=scfg["mosaic"],
    )  # fmt: skip
    dataset = StudentDataset(labeled, unlabeled, scfg["unlabeled_ratio"])
    stats = StudentData(
        labeled_images=len(labeled),
        unlabeled_images=len(unlabeled),
        cls_boxes=sum(len(t["boxes"]) for t in unlabeled.targets),
        reg_boxes=sum(len(t.get("reg_boxes", t["boxes"])) for t in unlabeled.targets),
        dropped_rows=sum(n for _, n in built),
        ignore_boxes=sum(len(t.get(IGNORE_KEY, ())) for t in unlabeled.targets),
    )
    check_usable_pseudo_labels(stats, scfg, pseudo, console, verbose)
    return dataset, stats


def check_usable_pseudo_labels(
    stats: StudentData, scfg: dict[str, Any], pseudo: str | Path, console: Console, verbose: bool
) -> None:
    """Report pseudo-label rows dropped as unusable, and refuse a student whose
    pseudo-labeled images hold no usable box (it would learn only background from them)
    unless ``allow_empty`` (then warn loudly); likewise one with no classification pseudo
    label while unkept boxes are ignore regions (``negatives`` ignore)."""
    if stats.dropped_rows and verbose:
        console.print(
            f"[yellow]warning:[/] {pseudo}: {stats.dropped_rows} pseudo-label row(s) dropped "
            "(non-finite, inverted or empty box after clipping to the image, or no label)",
            highlight=False,
        )
    used = scfg["unlabeled_ratio"] > 0 and scfg["unlabeled_weight"] > 0
    if not used or stats.unlabeled_images == 0 or stats.cls_boxes > 0:
        return
    dropped = f", {stats.dropped_rows} row(s) dropped as unusable" if stats.dropped_rows else ""
    if stats.reg_boxes == 0:
        problem = (
            f"{pseudo}: no usable pseudo label in its {stats.unlabeled_images} pseudo-labeled "
            f"image(s){dropped}: the student would learn only background from them"
        )
    elif scfg["negatives"] == "ignore":
        problem = (
            f"{pseudo}: no classification pseudo label (use_cls) in its "
            f"{stats.unlabeled_images} pseudo-labeled image(s), {stats.ignore_boxes} ignore "
            "region(s): with --negatives ignore they teach the student no classification"
        )
    else:
        return
    if not scfg["allow_empty"]:
        raise DplError(
            f"{problem}; lower polish --initial-threshold / --cls-prob, or pass --allow-empty "
            "(config: student.allow_empty)"
        )
    if verbose:
        console.print(f"[bold red]warning:[/] {problem} (--allow-empty: training anyway)")


def soft_negative_teacher(
    teacher: str | Path,
    categories: list[dict],
    ann: Path,
    device: Any,
    config: dict[str, Any],
) -> TeacherBackground:
    """The frozen teacher (eval mode, on ``device``) that weights the unlabeled images'
    background proposals under soft negatives; a DplError when there is none."""
    if str(teacher) == "imagenet" or not Path(teacher).is_file():
        raise DplError(
            f"--negatives soft needs the teacher checkpoint that scores background proposals; "
            f"{teacher} is not one (pass --teacher <teacher.pt>)"
        )
    model, spec = detector_from_checkpoint(read_checkpoint(teacher), teacher, None)
    check_categories(teacher, spec.categories, ann, categories)
    return TeacherBackground(model.to(device))


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
    allow_outside_root: bool = False,
    teacher: str | Path | None = None,
) -> tuple[nn.Module, DetectorSpec, TrainResult, StudentData]:
    """Train a student on ``ann`` (ground truth) + ``pseudo`` (pseudo labels) and save it
    to ``out`` (kind ``student``, loadable with ``load_detector``).

    ``init`` is a teacher checkpoint path or ``"imagenet"``; ``config`` has ``model`` and
    ``student`` sections. ``teacher`` scores background proposals under soft negatives
    (default: ``init``). Returns the model (eval mode), spec, run numbers and data counts.
    """
    console = console or Console()
    ann, out = Path(ann), Path(out)
    scfg = config["student"]
    check_together(config)  # for a config that did not come through load_config
    run = setup_training(scfg, device, seed)
    dist = run.dist
    dataset, stats = load_student_data(
        ann, images_dir, pseudo, unlabeled_images, scfg, console, dist.is_main, allow_outside_root
    )
    categories = dataset.labeled.coco.categories

    source = "model." if str(init) == "imagenet" else f"--init {init}: "

    def fresh() -> tuple[nn.Module, DetectorSpec]:
        model, spec = build_student(init, categories, ann, config)
        spec.extra.update(
            train_ann=str(ann),
            pseudo_labels=None if pseudo is None else str(pseudo),
            pseudo_view=scfg["pseudo_view"],
            disentangle=scfg["disentangle"],
            unlabeled_ratio=scfg["unlabeled_ratio"],
            unlabeled_weight=scfg["unlabeled_weight"],
            negatives=scfg["negatives"],
            config=plain(config),
        )
        if pseudo is not None and Path(pseudo).is_file():
            spec.extra["pseudo_labels_sha256"] = sha256_file(pseudo)
        return model, spec

    start = start_detector(
        out, resume, seed, dist.is_main, console, requested_student_model(init, config), fresh,
        lambda ckpt: _resume_student(ckpt, categories, out, ann, config), source,
        "starting from the initial weights",
    )  # fmt: skip
    make_student(start.model)
    scorer = None
    if scfg["negatives"] == "soft":
        scorer = soft_negative_teacher(teacher or init, categories, ann, run.device, config)
        strong = (scfg["pseudo_augment"] or scfg["augment"]) == "strong"
        if (strong or scfg["mixup"] or scfg["mosaic"]) and dist.is_main:
            console.print(
                "[yellow]warning:[/] --negatives soft: the teacher scores the background on "
                "the pseudo-labeled images as augmented (strong, mixup or mosaic), not on a "
                "weak view as Soft Teacher does; its weights are less reliable there",
                highlight=False,
            )
    result = train_detector(
        start, dataset, run, out, seed, console, "train-student",
        student_losses(scfg["unlabeled_weight"], scorer), collate_student,
    )  # fmt: skip
    return start.model, start.spec, result, stats
