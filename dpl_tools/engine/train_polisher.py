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
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor, nn
from torch.utils.data import Subset
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import box_iou, generalized_box_iou_loss

from dpl_tools.boxes import decode_deltas
from dpl_tools.data.coco import CocoData
from dpl_tools.data.detection import DetectionDataset
from dpl_tools.data.polisher_pairs import CLS, REAL, REG, mixed_rows, read_noise_metadata
from dpl_tools.data.pseudo_views import BOX_COORDS
from dpl_tools.engine.ema import ModelEMA
from dpl_tools.engine.keep_thresholds import KeepRuleFit, fit_heldout, fitted_record
from dpl_tools.engine.loop import (
    EMAHook,
    Hook,
    LossFn,
    SaveFn,
    TrainLoop,
    find_resume_checkpoint,
    last_checkpoint_path,
    train,
)
from dpl_tools.engine.setup import check_categories, load_train_coco, setup_training
from dpl_tools.errors import DplError
from dpl_tools.io import sha256_file, write_json
from dpl_tools.models.checkpoint import load_detector, unwrap
from dpl_tools.models.polisher import Polisher, read_polisher_checkpoint, save_polisher
from dpl_tools.runtime import amp_enabled, seed_everything

_BOX = list(BOX_COORDS)
_TARGET = [f"target_{c}" for c in _BOX]


@dataclass
class ImagePairs:
    """One image's pairs of one round: noisy boxes, targets, labels (original pixels)."""

    reg_boxes: np.ndarray
    reg_targets: np.ndarray
    cls_boxes: np.ndarray
    cls_labels: np.ndarray


class NoisePairs:
    """The pairs of a noise file, one round at a time, indexed by image id. Where the file
    has real pairs (``source`` "real": crossfit or a labeler's detections), each image's
    pairs of each kind are mixed so that real ones make up ``real_fraction`` of them
    (``mixed_rows``)."""

    def __init__(self, path: str | Path, image_ids: set[int], real_fraction: float = 0.5) -> None:
        self.path = Path(path)
        self.meta = read_noise_metadata(self.path)
        self.rounds = int(self.meta.get("rounds", 1))
        self.image_ids = image_ids
        self.real_fraction = real_fraction
        self.has_source = "source" in pq.read_schema(self.path).names
        self._round: int | None = None
        self._pairs: dict[int, ImagePairs] = {}

    def load_round(self, round_: int) -> None:
        """Read round ``round_`` (only its rows, only this run's images) into memory."""
        if round_ == self._round:
            return
        table = pq.read_table(
            self.path,
            columns=["image_id", "kind", *_BOX, *_TARGET, "label"]
            + (["source"] if self.has_source else []),
            filters=[("round", "=", round_)],
        )
        is_real = (
            pc.equal(table["source"], REAL).to_numpy(zero_copy_only=False)
            if self.has_source
            else np.zeros(table.num_rows, bool)
        )
        ids = table["image_id"].to_numpy()
        keep = np.isin(ids, np.fromiter(self.image_ids, np.int64, len(self.image_ids)))
        is_reg = (pc.equal(table["kind"], REG)).to_numpy(zero_copy_only=False)
        boxes = np.stack([table[c].to_numpy() for c in _BOX], 1)
        targets = np.stack([table[c].to_numpy() for c in _TARGET], 1)
        labels = table["label"].to_numpy()
        self._pairs = {}
        for kind_mask, kind in ((is_reg, REG), (~is_reg, CLS)):
            sel = np.flatnonzero(keep & kind_mask)
            order = sel[np.argsort(ids[sel], kind="stable")]
            uniq, starts = np.unique(ids[order], return_index=True)
            bounds = np.append(starts, len(order))
            for k, image_id in enumerate(uniq.tolist()):
                rows = order[bounds[k] : bounds[k + 1]]
                if is_real[rows].any():
                    rng = np.random.default_rng([round_, image_id, kind == REG])
                    rows = rows[mixed_rows(is_real[rows], self.real_fraction, rng)]
                entry = self._pairs.setdefault(
                    image_id,
                    ImagePairs(
                        np.zeros((0, 4), np.float32),
                        np.zeros((0, 4), np.float32),
                        np.zeros((0, 4), np.float32),
                        np.zeros(0, np.int64),
                    ),
                )
                if kind == REG:
                    entry.reg_boxes, entry.reg_targets = boxes[rows], targets[rows]
                else:
                    entry.cls_boxes, entry.cls_labels = boxes[rows], labels[rows].astype(np.int64)
        self._round = round_

    def get(self, image_id: int) -> ImagePairs | None:
        return self._pairs.get(int(image_id))


@dataclass
class PolisherBatch:
    """Training inputs of one step, in the teacher's resized coordinates (per image)."""

    features: dict[str, Tensor]
    image_sizes: list[tuple[int, int]]
    reg_boxes: list[Tensor]
    reg_targets: list[Tensor]
    cls_boxes: list[Tensor]
    cls_labels: list[Tensor]


def _sample(n: int, cap: int, generator: torch.Generator) -> Tensor:
    if cap <= 0 or n <= cap:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:cap]


def proposal_labels(
    proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, fg_iou: float
) -> Tensor:
    """Class of the best-IoU GT box if that IoU >= ``fg_iou``, else background (0)."""
    if len(gt_boxes) == 0:
        return torch.zeros(len(proposals), dtype=torch.int64, device=proposals.device)
    best_iou, best = box_iou(proposals, gt_boxes).max(dim=1)
    return torch.where(best_iou >= fg_iou, gt_labels[best], torch.zeros_like(best))


@torch.no_grad()
def teacher_batch(
    teacher: FasterRCNN,
    images: list[Tensor],
    targets: list[dict],
    pairs: list[ImagePairs | None],
    reg_cap: int,
    cls_cap: int,
    max_proposals: int,
    fg_iou: float,
    generator: torch.Generator,
) -> PolisherBatch:
    """One frozen-teacher pass (features + RPN proposals) and the sampled pairs of a batch."""
    device = images[0].device
    with torch.autocast(device.type, enabled=amp_enabled(device)):
        batch, _ = teacher.transform(images)
        features = teacher.backbone(batch.tensors)
        proposals, _ = teacher.rpn(batch, features) if max_proposals > 0 else ([], None)
    features = {k: v.float() for k, v in features.items()}
    sizes = [tuple(s) for s in batch.image_sizes]
    out = PolisherBatch(features, sizes, [], [], [], [])
    for i, (image, target, p) in enumerate(zip(images, targets, pairs, strict=True)):
        original, resized = tuple(image.shape[-2:]), sizes[i]

        def scaled(boxes: np.ndarray, original=original, resized=resized) -> Tensor:
            t = torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)).to(device)
            return resize_boxes(t, original, resized)

        empty = torch.zeros((0, 4), device=device)
        if p is None:
            reg_b, reg_t, cls_b = empty, empty, empty
            cls_l = torch.zeros(0, dtype=torch.int64, device=device)
        else:
            k = _sample(len(p.reg_boxes), reg_cap, generator).numpy()
            reg_b, reg_t = scaled(p.reg_boxes[k]), scaled(p.reg_targets[k])
            cls_b = scaled(p.cls_boxes)
            cls_l = torch.from_numpy(p.cls_labels).to(device)
        if max_proposals > 0:
            props = proposals[i][:max_proposals].float()
            gt = resize_boxes(target["boxes"].to(device), original, resized)
            labels = proposal_labels(props, gt, target["labels"].to(device), fg_iou)
            cls_b, cls_l = torch.cat([cls_b, props]), torch.cat([cls_l, labels])
        k = _sample(len(cls_b), cls_cap, generator).to(device)
        out.reg_boxes.append(reg_b)
        out.reg_targets.append(reg_t)
        out.cls_boxes.append(cls_b[k])
        out.cls_labels.append(cls_l[k])
    return out


class PolisherLoss(nn.Module):
    """Both polishers' losses for a ``PolisherBatch`` (a module, so DDP can wrap it)."""

    def __init__(self, polisher: Polisher) -> None:
        super().__init__()
        self.polisher = polisher

    def forward(self, b: PolisherBatch) -> dict[str, Tensor]:
        pol = self.polisher
        zero = sum(p.sum() * 0.0 for p in pol.parameters())  # every parameter joins the graph
        losses = {"reg": zero, "cls": zero}
        if sum(len(x) for x in b.reg_boxes):
            deltas = pol.regression(pol.vote_features(b.features, b.reg_boxes, b.image_sizes))
            decoded = decode_deltas(deltas.float(), torch.cat(b.reg_boxes))
            target = torch.cat(b.reg_targets)
            losses["reg"] = zero + generalized_box_iou_loss(decoded, target, reduction="mean")
        if sum(len(x) for x in b.cls_boxes):
            logits = pol.classification(pol.box_features(b.features, b.cls_boxes, b.image_sizes))
            losses["cls"] = zero + F.cross_entropy(logits.float(), torch.cat(b.cls_labels))
        return losses


@torch.no_grad()
def evaluate_polisher(polisher: Polisher, batches: Iterable[PolisherBatch]) -> dict[str, Any]:
    """Mean IoU to GT of the noisy boxes before / after regression polishing, and the
    classification accuracy, foreground recall (right class) and background recall.
    ``batches`` may be a generator: only per-box results are kept, not the features."""
    polisher.eval()
    before, after, correct, labels = [], [], [], []
    for b in batches:
        if sum(len(x) for x in b.reg_boxes):
            refined = polisher.regress(b.features, b.reg_boxes, b.image_sizes)
            for box, new, target in zip(b.reg_boxes, refined, b.reg_targets, strict=True):
                before.append(box_iou(box, target).diagonal())
                after.append(box_iou(new, target).diagonal())
        if sum(len(x) for x in b.cls_boxes):
            probs = polisher.classify(b.features, b.cls_boxes, b.image_sizes)
            for p, lab in zip(probs, b.cls_labels, strict=True):
                correct.append(p.argmax(dim=1) == lab)
                labels.append(lab)
    result: dict[str, Any] = {"reg_pairs": 0, "cls_samples": 0}
    if before:
        b_iou, a_iou = torch.cat(before), torch.cat(after)
        result.update(
            reg_pairs=len(b_iou),
            mean_iou_before=float(b_iou.mean()),
            mean_iou_after=float(a_iou.mean()),
            improved_fraction=float((a_iou > b_iou).float().mean()),
        )
    if correct:
        ok, lab = torch.cat(correct), torch.cat(labels)
        fg, bg = lab > 0, lab == 0
        result.update(
            cls_samples=len(ok),
            foreground_samples=int(fg.sum()),
            cls_accuracy=float(ok.float().mean()),
            fg_recall=float(ok[fg].float().mean()) if fg.any() else None,
            bg_recall=float(ok[bg].float().mean()) if bg.any() else None,
        )
    return result


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
    ckpt: dict,
    where: Path,
    polisher: Polisher,
    teacher_path: str | Path,
    ann: str | Path,
    coco: CocoData,
) -> dict:
    """Load a periodic checkpoint's (``where``) raw weights into ``polisher``; its training
    state for the loop (the EMA weights back under the EMA hook)."""
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
    noise_meta = read_noise_metadata(noise_path)
    check_categories(teacher_path, spec.categories, ann, coco.categories, "the teacher's")
    check_categories(
        noise_path, noise_meta.get("categories", []), ann, coco.categories, "the noise file's"
    )
    with_boxes = sorted({a["image_id"] for a in coco.annotations if not a.get("iscrowd", 0)})
    if not with_boxes:
        raise DplError(f"{ann}: no boxes to train the polishers on")
    train_ids, val_ids = split_validation(with_boxes, float(pcfg["val_fraction"]), seed)
    real_fraction = float(pcfg["real_fraction"])
    pairs = NoisePairs(noise_path, set(train_ids) | set(val_ids), real_fraction)
    pairs.load_round(0)
    if not any(pairs.get(i) for i in train_ids):
        raise DplError(f"{noise_path}: no pairs for the images of {ann} (made from another set?)")

    resume_ckpt = find_resume_checkpoint(out, read_polisher_checkpoint) if resume else None
    if resume and resume_ckpt is None and dist.is_main:
        console.print(f"no checkpoint to resume at {last_checkpoint_path(out)}; starting afresh")
    seed_everything(seed)
    polisher = Polisher.for_teacher(teacher, spec.num_classes).to(torch_device)
    ema = ModelEMA(polisher, float(pcfg["ema_momentum"]))
    resume_state = None
    if resume_ckpt is not None:  # only periodic checkpoints hold a training state
        where = last_checkpoint_path(out)
        resume_state = _resume_state(resume_ckpt, where, polisher, teacher_path, ann, coco)

    index_of = {r["id"]: k for k, r in enumerate(coco.images)}
    dataset = DetectionDataset(coco, images_dir)
    train_set = Subset(dataset, [index_of[i] for i in train_ids])
    generator = torch.Generator().manual_seed(seed + dist.rank)
    caps = (int(pcfg["reg_per_image"]), int(pcfg["cls_per_image"]))
    max_props, fg_iou = int(pcfg["max_proposals"]), float(pcfg["fg_iou"])

    def val_batches() -> Iterator[PolisherBatch]:
        pairs.load_round(0)
        val_gen = torch.Generator().manual_seed(seed)
        for image_id in val_ids:
            item = dataset[index_of[image_id]]
            if item is None:
                continue
            image, target = item
            yield teacher_batch(
                teacher, [image.to(torch_device)], [target], [pairs.get(image_id)],
                *caps, max_props, fg_iou, val_gen,
            )  # fmt: skip

    validation = PolisherValidation(ema, val_batches, len(val_ids))
    initial = float(config["polish"]["initial_thresh"])

    def fit(path: Path, trained: Polisher) -> dict[str, Any] | None:
        fitted = fit_heldout(
            path, teacher, spec.label_to_cat, trained, coco, images_dir, initial,
            pcfg["precision_target"], torch_device, int(pcfg["batch_size"]),
            int(pcfg["workers"]), int(pcfg["keep_fit_min_matches"]), pcfg["keep_fallback"],
            val_ids, int(pcfg["reg_check_min_pairs"]),
        )  # fmt: skip
        return None if fitted is None else fitted_record(fitted, path, initial)

    keep_fit = KeepRuleFit(ema.module, crossfit, fit, bool(pcfg["fit_keep_rule"]))
    extra = {
        "config": pcfg,
        "noise": _learned_from(noise_meta.get("noise", {}), pairs),
        "noise_file": str(noise_path),
        "ann": str(ann),
        "ema_momentum": ema.momentum,
    }
    result = train(
        PolisherLoss(polisher),
        train_set,
        cfg,
        torch_device,
        dist,
        loss_fn=polisher_losses(teacher, pairs, caps, max_props, fg_iou, generator),
        save=polisher_saver(out, ema, teacher_path, spec.categories, extra, validation, keep_fit),
        resume_state=resume_state,
        description="train-polisher",
        out=out,
        console=console,
        hooks=[PairRounds(pairs), EMAHook(ema, polisher), *hooks, validation, keep_fit],
        generators={"pairs": generator},
        progress_parts=("reg", "cls"),
    )
    last = result.last_losses or {"reg": math.nan, "cls": math.nan}
    if dist.is_main and val_json is not None:
        write_json(val_json, validation.figures, indent=2)
    figures = validation.figures
    return ema.module, PolisherResult(
        result.iterations,
        result.seconds,
        last,
        len(train_ids),
        len(val_ids),
        figures,
        result.iterations_run,
        keep_thresholds=keep_fit.fitted,
        keep_note=keep_fit.note,
        regression_check=keep_fit.regression,
    )
