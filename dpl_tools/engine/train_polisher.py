"""Training of the two polishing networks on synthesized pairs, with the teacher frozen.

Per step, for a batch of labeled images: one pass of the frozen teacher (transform,
backbone, RPN) gives the FPN features and up to 1000 RPN proposals; the image's noise pairs
of the current round (``noise.parquet``; round r covers iterations [r, r+1) * iters / R)
are sampled up to the per-image caps and moved into the teacher's resized coordinates.
The regression polisher sees the 7 vote-box features of each noisy box and is trained with
GIoU loss between its decoded box and the target GT; the classification polisher sees the
box's own feature, for classification pairs and RPN proposals (label: class of the best
GT if IoU >= 0.7, else background), with cross-entropy. Both are trained jointly by the
one training loop (``dpl_tools.engine.loop``: SGD, warm-up + step decay, AMP on GPU, DDP
under torchrun, periodic checkpoints and resume) and an EMA copy (momentum 0.99, a loop
hook) is kept: that copy is validated on held-out labeled images and saved.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import Tensor, nn
from torch.utils.data import Subset
from torchvision.models.detection import FasterRCNN

from dpl_tools.config import plain
from dpl_tools.data.coco import CocoData
from dpl_tools.data.detection import DetectionDataset
from dpl_tools.data.polisher_pairs import read_noise_metadata
from dpl_tools.data.pseudo_views import BOX_COORDS
from dpl_tools.engine.ema import ModelEMA
from dpl_tools.engine.keep_thresholds import KeepRuleFit, fit_heldout, fitted_record
from dpl_tools.engine.loop import (
    EMAHook,
    Hook,
    LossFn,
    SaveFn,
    TrainLoop,
    last_checkpoint_path,
    train,
)
from dpl_tools.engine.polisher_batches import (
    NoisePairs,
    PolisherBatch,
    PolisherLoss,
    evaluate_polisher,
    teacher_batch,
)
from dpl_tools.engine.setup import (
    check_categories,
    load_train_coco,
    resume_checkpoint,
    setup_training,
)
from dpl_tools.errors import DplError
from dpl_tools.io import sha256_file, write_json
from dpl_tools.models.checkpoint import load_detector, unwrap
from dpl_tools.models.polisher import Polisher, read_polisher_checkpoint, save_polisher
from dpl_tools.runtime import seed_everything

_BOX = list(BOX_COORDS)
_TARGET = [f"target_{c}" for c in _BOX]


@dataclass
class PolisherResult:
    """What a polisher training run did (``iterations_run``: those of this process, less
    than ``iterations`` when resumed)."""

    iterations: int
    seconds: float
    last_losses: dict[str, float]
    train_images: int
    val_images: int
    validation: dict[str, Any]
    iterations_run: int = 0
    keep_thresholds: dict[str, Any] | None = None  # fitted (``keep_thresholds.fitted_record``)
    regression_check: dict[str, Any] | None = None  # ``regression_check.check_regression``
    keep_note: str = ""  # why they were not fitted


def split_validation(image_ids: list[int], fraction: float, seed: int) -> tuple[list, list]:
    """(train ids, held-out ids): a seeded random ``fraction`` of the images is held out."""
    if fraction <= 0 or len(image_ids) < 2:
        return list(image_ids), []
    rng = np.random.default_rng(seed)
    n_val = min(max(1, round(fraction * len(image_ids))), len(image_ids) - 1)
    order = rng.permutation(len(image_ids))
    val = {image_ids[k] for k in order[:n_val]}
    return [i for i in image_ids if i not in val], [i for i in image_ids if i in val]


class PairRounds(Hook):
    """Loads the noise round of each step: round r covers iterations [r, r+1) * iters / R."""

    def __init__(self, pairs: NoisePairs) -> None:
        self.pairs = pairs

    def before_step(self, loop: TrainLoop) -> None:
        rounds, iters = self.pairs.rounds, max(loop.cfg.iters, 1)
        self.pairs.load_round(min(loop.iteration * rounds // iters, rounds - 1))


def polisher_losses(
    teacher: FasterRCNN,
    pairs: NoisePairs,
    caps: tuple[int, int],
    max_proposals: int,
    fg_iou: float,
    generator: torch.Generator,
) -> LossFn:
    """The loop's loss: one frozen-teacher pass and the sampled pairs of a batch
    (``teacher_batch``), then both polishers' losses (``net``: a ``PolisherLoss``)."""

    def loss_fn(net: nn.Module, images: list, targets: list) -> dict[str, Tensor]:
        image_pairs = [pairs.get(t["image_id"]) for t in targets]
        batch = teacher_batch(
            teacher, images, targets, image_pairs, *caps, max_proposals, fg_iou, generator
        )
        return net(batch)

    return loss_fn


class PolisherValidation(Hook):
    """After training (rank 0): the EMA polisher's figures on the held-out images
    (``evaluate_polisher``), in ``figures`` for the final checkpoint and the report."""

    def __init__(
        self, ema: ModelEMA, val_batches: Callable[[], Iterable[PolisherBatch]], n_images: int
    ) -> None:
        self.ema, self.val_batches = ema, val_batches
        self.figures: dict[str, Any] = {"val_images": n_images}

    def after_train(self, loop: TrainLoop) -> None:
        if loop.finished and loop.dist.is_main and self.figures["val_images"]:
            self.figures.update(evaluate_polisher(self.ema.module, self.val_batches()))


def polisher_saver(
    out: str | Path,
    ema: ModelEMA,
    teacher_path: str | Path,
    categories: list[dict],
    extra: dict[str, Any],
    validation: PolisherValidation,
    keep_fit: KeepRuleFit | None = None,
) -> SaveFn:
    """The loop's ``save``: the EMA polisher (what polishing loads) with ``extra``; the
    final one to ``out`` (with the fitted keep thresholds, ``keep_thresholds``: None when
    not fitted), periodic ones to ``<out stem>.last.pt`` with the training state and the
    raw weights (the EMA weights are the file's own, not stored twice)."""

    def save(net: nn.Module, state: dict, final: bool) -> None:
        info = {**extra, "iterations": state["iteration"], "last_losses": state["last_losses"]}
        if final:
            info = {"validation": validation.figures, **info}
            info["keep_thresholds"] = keep_fit.fitted if keep_fit else None
            info["regression_check"] = keep_fit.regression if keep_fit else None
            save_polisher(out, ema.module, teacher_path, categories, extra=info)
            last_checkpoint_path(out).unlink(missing_ok=True)
            return
        polisher = unwrap(net).polisher
        hooks = {k: v for k, v in state["hooks"].items() if k != "ema"}
        model = {k: v.detach().cpu() for k, v in polisher.state_dict().items()}
        state = {**state, "hooks": hooks, "model": model}
        save_polisher(last_checkpoint_path(out), ema.module, teacher_path, categories, info, state)

    return save


def _resume_state(
    out: str | Path, polisher: Polisher, teacher_path: str | Path, ann: str | Path,
    coco: CocoData, console: Console, dist: Any,
) -> dict | None:  # fmt: skip
    """Load the periodic checkpoint of ``out`` (``<stem>.last.pt``) into ``polisher`` and
    return its training state for the loop (the EMA weights back under the EMA hook); None
    (said on the main process) when there is none to resume."""
    where = last_checkpoint_path(out)
    ckpt = resume_checkpoint(out, True, dist.is_main, console, read_polisher_checkpoint,
                             "starting afresh")  # fmt: skip
    if ckpt is None:
        return None
    if ckpt["teacher_sha256"] != sha256_file(teacher_path):
        raise DplError(f"{where}: trained with another teacher than {teacher_path}; cannot resume")
    check_categories(where, ckpt["categories"], ann, coco.categories, consequence="cannot resume")
    state = ckpt["train_state"]
    try:
        polisher.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as e:
        raise DplError(f"{where}: not a checkpoint of this polisher ({type(e).__name__})") from None
    return {**state, "hooks": {**state.get("hooks", {}), "ema": ckpt["state_dict"]}}


def _learned_from(noise: dict[str, Any], pairs: NoisePairs) -> dict[str, Any]:
    """What the checkpoint records of its noise: the file's noise description, with the
    share of real pairs used (``real_fraction``) where the file has real pairs."""
    if noise.get("model") not in ("crossfit", "detections"):  # no real pairs
        return noise
    return {**noise, "real_fraction": pairs.real_fraction}


def train_polisher(
    teacher_path: str | Path,
    noise_path: str | Path,
    ann: str | Path,
    images_dir: str | Path,
    out: str | Path,
    config: dict[str, Any],
    device: str = "auto",
    seed: int = 0,
    val_json: str | Path | None = None,
    console: Console | None = None,
    resume: bool = False,
    hooks: Sequence[Hook] = (),
    allow_outside_root: bool = False,
    crossfit: Sequence[str | Path] = (),
) -> tuple[Polisher, PolisherResult]:
    """Train both polishers on ``noise_path``'s pairs with the frozen teacher; write the EMA
    polisher to ``out`` (tied to the teacher's hash) and return it with the run's figures.

    ``resume``: continue from ``<out stem>.last.pt`` (written every ``checkpoint_every``
    steps); ``hooks``: extra loop hooks (run after the EMA update); ``crossfit``: where
    to look for cross-fitted detections (the first existing file) to fit the keep
    thresholds on after training (``keep_thresholds``; none: the paper's stay, noted).
    """
    console = console or Console()
    pcfg = config["polisher"]
    run = setup_training(pcfg, device, seed)
    torch_device, dist, cfg = run.device, run.dist, run.cfg

    teacher, spec = load_detector(teacher_path, torch_device)
    teacher.eval().requires_grad_(False)
    coco = load_train_coco(ann, images_dir, console, dist.is_main, allow_outside_root)
    check_categories(teacher_path, spec.categories, ann, coco.categories, "the teacher's")
    noise_meta, train_ids, val_ids, pairs = _training_pairs(noise_path, ann, coco, pcfg, seed)

    seed_everything(seed)
    polisher = Polisher.for_teacher(teacher, spec.num_classes).to(torch_device)
    ema = ModelEMA(polisher, pcfg["ema_momentum"])
    resume_state = None
    if resume:  # only periodic checkpoints hold a training state
        resume_state = _resume_state(out, polisher, teacher_path, ann, coco, console, dist)

    index_of = {r["id"]: k for k, r in enumerate(coco.images)}
    dataset = DetectionDataset(coco, images_dir)
    train_set = Subset(dataset, [index_of[i] for i in train_ids])
    generator = torch.Generator().manual_seed(seed + dist.rank)
    caps = (pcfg["reg_per_image"], pcfg["cls_per_image"])
    max_props, fg_iou = pcfg["max_proposals"], pcfg["fg_iou"]

    val_set = Subset(dataset, [index_of[i] for i in val_ids])
    val_batches = _validation_batches(teacher, val_set, val_ids, pairs, caps, max_props, fg_iou,
                                      seed, torch_device)  # fmt: skip
    validation = PolisherValidation(ema, val_batches, len(val_ids))
    fit = _keep_rule_fitter(teacher, spec.label_to_cat, coco, images_dir, config, torch_device,
                            val_ids)  # fmt: skip
    keep_fit = KeepRuleFit(ema.module, crossfit, fit, pcfg["fit_keep_rule"])
    noise = _learned_from(noise_meta.get("noise", {}), pairs)
    extra = {"config": plain(pcfg), "noise": noise, "noise_file": str(noise_path), "ann": str(ann),
             "ema_momentum": ema.momentum}  # fmt: skip
    result = train(
        PolisherLoss(polisher), train_set, cfg, torch_device, dist,
        loss_fn=polisher_losses(teacher, pairs, caps, max_props, fg_iou, generator),
        save=polisher_saver(out, ema, teacher_path, spec.categories, extra, validation, keep_fit),
        resume_state=resume_state, description="train-polisher", out=out, console=console,
        hooks=[PairRounds(pairs), EMAHook(ema, polisher), *hooks, validation, keep_fit],
        generators={"pairs": generator}, progress_parts=("reg", "cls"),
    )  # fmt: skip
    last = result.last_losses or {"reg": math.nan, "cls": math.nan}
    if dist.is_main and val_json is not None:
        write_json(val_json, validation.figures, indent=2)
    return ema.module, PolisherResult(
        result.iterations, result.seconds, last, len(train_ids), len(val_ids),
        validation.figures, result.iterations_run, keep_thresholds=keep_fit.fitted,
        keep_note=keep_fit.note, regression_check=keep_fit.regression,
    )  # fmt: skip


def _validation_batches(
    teacher: FasterRCNN, images: Subset, image_ids: list[int], pairs: NoisePairs,
    caps: tuple[int, int], max_props: int, fg_iou: float, seed: int, device: torch.device,
) -> Callable[[], Iterator[PolisherBatch]]:  # fmt: skip
    """The held-out images' batches (one image each, round-0 pairs, a fixed sampling seed),
    made afresh at every validation."""

    def batches() -> Iterator[PolisherBatch]:
        pairs.load_round(0)
        generator = torch.Generator().manual_seed(seed)
        for image_id, item in zip(image_ids, images, strict=True):
            if item is not None:
                image, target = item
                yield teacher_batch(
                    teacher, [image.to(device)], [target], [pairs.get(image_id)],
                    *caps, max_props, fg_iou, generator,
                )  # fmt: skip

    return batches


def _keep_rule_fitter(
    teacher: FasterRCNN, label_to_cat: dict[int, int], coco: CocoData, images_dir: str | Path,
    config: dict[str, Any], device: torch.device, val_ids: list[int],
) -> Callable[[Path, Polisher], dict[str, Any] | None]:  # fmt: skip
    """What ``KeepRuleFit`` runs after training: the keep rule fitted on the cross-fitted
    detections at ``path`` with the trained polisher (``keep_thresholds.fit_heldout``)."""
    pcfg, initial = config["polisher"], config["polish"]["initial_thresh"]

    def fit(path: Path, trained: Polisher) -> dict[str, Any] | None:
        fitted = fit_heldout(
            path, teacher, label_to_cat, trained, coco, images_dir, initial,
            pcfg["precision_target"], device, pcfg["batch_size"],
            pcfg["workers"], pcfg["keep_fit_min_matches"], pcfg["keep_fallback"],
            val_ids, pcfg["reg_check_min_pairs"],
        )  # fmt: skip
        return None if fitted is None else fitted_record(fitted, path, initial)

    return fit


def _training_pairs(
    noise_path: str | Path, ann: str | Path, coco: CocoData, pcfg: dict[str, Any], seed: int
) -> tuple[dict[str, Any], list[int], list[int], NoisePairs]:
    """The noise file's metadata, the training and validation image ids (images with
    boxes) and their pairs, round 0 loaded; one-line errors when there is nothing to train
    on or the pairs were made from another set."""
    noise_meta = read_noise_metadata(noise_path)
    check_categories(
        noise_path, noise_meta.get("categories", []), ann, coco.categories, "the noise file's"
    )
    with_boxes = sorted({a["image_id"] for a in coco.annotations if not a.get("iscrowd", 0)})
    if not with_boxes:
        raise DplError(f"{ann}: no boxes to train the polishers on")
    train_ids, val_ids = split_validation(with_boxes, pcfg["val_fraction"], seed)
    pairs = NoisePairs(noise_path, set(train_ids) | set(val_ids), pcfg["real_fraction"])
    pairs.load_round(0)
    if not any(pairs.get(i) for i in train_ids):
        raise DplError(f"{noise_path}: no pairs for the images of {ann} (made from another set?)")
    return noise_meta, train_ids, val_ids, pairs
