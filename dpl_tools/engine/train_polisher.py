"""Training of the two polishing networks on synthesized pairs, with the teacher frozen.

Per step, for a batch of labeled images: one pass of the frozen teacher (transform,
backbone, RPN) gives the FPN features and up to 1000 RPN proposals; the image's noise pairs
of the current round (``noise.parquet``; round r covers iterations [r, r+1) * iters / R)
are sampled up to the per-image caps and moved into the teacher's resized coordinates.
The regression polisher sees the 7 vote-box features of each noisy box and is trained with
GIoU loss between its decoded box and the target GT; the classification polisher sees the
box's own feature, for classification pairs and RPN proposals (label: class of the best
GT if IoU >= 0.7, else background), with cross-entropy. Both are trained jointly (SGD,
warm-up + step decay, AMP on GPU, DDP under torchrun) and an EMA copy (momentum 0.99) is
kept: that copy is validated on held-out labeled images and saved.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import box_iou, generalized_box_iou_loss

from dpl_tools.boxes import decode_deltas
from dpl_tools.config import register_defaults
from dpl_tools.data.coco import CocoData, load_coco
from dpl_tools.data.detection import DetectionDataset, collate_detection
from dpl_tools.engine.ema import ModelEMA
from dpl_tools.engine.train_detector import StreamSampler, TrainConfig, optimizer_step
from dpl_tools.errors import DplError
from dpl_tools.io import write_json
from dpl_tools.models.checkpoint import load_detector
from dpl_tools.models.polisher import Polisher, save_polisher
from dpl_tools.noise import CLS, REG, read_noise_metadata
from dpl_tools.runtime import (
    amp_enabled,
    init_distributed,
    resolve_device,
    seed_everything,
)

register_defaults(
    "polisher",
    {
        # training (dpl train-polisher); the pair synthesis keys are in dpl_tools.noise
        "iters": 400,
        "batch_size": 2,  # images per step per process
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 0.0001,
        "warmup_iters": 50,
        "warmup_factor": 0.001,
        "lr_steps": [0.667, 0.889],
        "gamma": 0.1,
        "clip_grad_norm": 10.0,
        "workers": 2,
        "reg_per_image": 256,
        "cls_per_image": 512,
        "max_proposals": 1000,
        "ema_momentum": 0.99,
        "val_fraction": 0.1,
    },
)

_BOX = ["x1", "y1", "x2", "y2"]
_TARGET = [f"target_{c}" for c in _BOX]


@dataclass
class ImagePairs:
    """One image's pairs of one round: noisy boxes, targets, labels (original pixels)."""

    reg_boxes: np.ndarray
    reg_targets: np.ndarray
    cls_boxes: np.ndarray
    cls_labels: np.ndarray


class NoisePairs:
    """The pairs of a noise file, one round at a time, indexed by image id."""

    def __init__(self, path: str | Path, image_ids: set[int]) -> None:
        self.path = Path(path)
        self.meta = read_noise_metadata(self.path)
        self.rounds = int(self.meta.get("rounds", 1))
        self.image_ids = image_ids
        self._round: int | None = None
        self._pairs: dict[int, ImagePairs] = {}

    def load_round(self, round_: int) -> None:
        """Read round ``round_`` (only its rows, only this run's images) into memory."""
        if round_ == self._round:
            return
        table = pq.read_table(
            self.path,
            columns=["image_id", "kind", *_BOX, *_TARGET, "label"],
            filters=[("round", "=", round_)],
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
    """What a polisher training run did."""

    iterations: int
    seconds: float
    last_losses: dict[str, float]
    train_images: int
    val_images: int
    validation: dict[str, Any]


def split_validation(image_ids: list[int], fraction: float, seed: int) -> tuple[list, list]:
    """(train ids, held-out ids): a seeded random ``fraction`` of the images is held out."""
    if fraction <= 0 or len(image_ids) < 2:
        return list(image_ids), []
    rng = np.random.default_rng(seed)
    n_val = min(max(1, round(fraction * len(image_ids))), len(image_ids) - 1)
    order = rng.permutation(len(image_ids))
    val = {image_ids[k] for k in order[:n_val]}
    return [i for i in image_ids if i not in val], [i for i in image_ids if i in val]


def _progress(console: Console | None, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "reg {task.fields[reg]:.3f}  cls {task.fields[cls]:.3f}  lr {task.fields[lr]:.1e}"
        ),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


def _check_categories(coco: CocoData, spec_categories: list[dict], noise_meta: dict, paths) -> None:
    ids = [c["id"] for c in coco.categories]
    if [c["id"] for c in spec_categories] != ids:
        raise DplError(f"{paths[0]}: the teacher's classes differ from those of {paths[1]}")
    if [c["id"] for c in noise_meta.get("categories", [])] != ids:
        raise DplError(f"{paths[2]}: the noise file's classes differ from those of {paths[1]}")


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
) -> tuple[Polisher, PolisherResult]:
    """Train both polishers on ``noise_path``'s pairs with the frozen teacher; write the EMA
    polisher to ``out`` (tied to the teacher's hash) and return it with the run's figures."""
    console = console or Console()
    pcfg = config["polisher"]
    torch_device = resolve_device(device)
    dist = init_distributed(torch_device)
    if dist.enabled and torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    cfg = TrainConfig.from_section(pcfg, seed=seed)

    teacher, spec = load_detector(teacher_path, torch_device)
    teacher.eval().requires_grad_(False)
    coco = load_coco(ann, images_dir)
    noise_meta = read_noise_metadata(noise_path)
    _check_categories(coco, spec.categories, noise_meta, (teacher_path, ann, noise_path))
    with_boxes = sorted({a["image_id"] for a in coco.annotations if not a.get("iscrowd", 0)})
    if not with_boxes:
        raise DplError(f"{ann}: no boxes to train the polishers on")
    train_ids, val_ids = split_validation(with_boxes, float(pcfg["val_fraction"]), seed)
    pairs = NoisePairs(noise_path, set(train_ids) | set(val_ids))
    pairs.load_round(0)
    if not any(pairs.get(i) for i in train_ids):
        raise DplError(f"{noise_path}: no pairs for the images of {ann} (made from another set?)")

    seed_everything(seed)
    polisher = Polisher.for_teacher(teacher, spec.num_classes).to(torch_device)
    ema = ModelEMA(polisher, float(pcfg["ema_momentum"]))
    step_module: nn.Module = PolisherLoss(polisher)
    if dist.enabled:
        step_module = DistributedDataParallel(
            step_module, device_ids=[torch_device.index] if torch_device.type == "cuda" else None
        )
    params = [p for p in polisher.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    use_amp = amp_enabled(torch_device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    index_of = {r["id"]: k for k, r in enumerate(coco.images)}
    dataset = DetectionDataset(coco, images_dir, train=False)
    train_set = Subset(dataset, [index_of[i] for i in train_ids])
    loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        sampler=StreamSampler(train_set, dist, cfg.seed),
        collate_fn=collate_detection,
        num_workers=cfg.workers,
        pin_memory=torch_device.type == "cuda",
    )
    generator = torch.Generator().manual_seed(seed + dist.rank)
    caps = (int(pcfg["reg_per_image"]), int(pcfg["cls_per_image"]))
    max_props, fg_iou = int(pcfg["max_proposals"]), float(pcfg["fg_iou"])

    last = {"reg": math.nan, "cls": math.nan}
    began = time.perf_counter()
    batches = iter(loader)
    with _progress(console, dist.is_main) as progress:
        task = progress.add_task(
            "train-polisher", total=cfg.iters, reg=math.nan, cls=math.nan, lr=0.0
        )
        for iteration in range(cfg.iters):
            pairs.load_round(min(iteration * pairs.rounds // max(cfg.iters, 1), pairs.rounds - 1))
            images, targets = next(batches)
            if not images:
                continue
            lr = cfg.lr_at(iteration)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = [im.to(torch_device, non_blocking=True) for im in images]
            batch = teacher_batch(
                teacher, images, targets, [pairs.get(t["image_id"]) for t in targets],
                *caps, max_props, fg_iou, generator,
            )  # fmt: skip
            polisher.train()
            with torch.autocast(torch_device.type, enabled=use_amp):
                losses = step_module(batch)
            optimizer_step(losses["reg"] + losses["cls"], optimizer, scaler, params, cfg, iteration)
            ema.update(polisher)
            last = {k: float(v.detach()) for k, v in losses.items()}
            progress.update(task, completed=iteration + 1, lr=lr, **last)
    seconds = time.perf_counter() - began

    validation: dict[str, Any] = {"val_images": len(val_ids)}
    if dist.is_main and val_ids:
        pairs.load_round(0)
        val_gen = torch.Generator().manual_seed(seed)

        def val_batches() -> Iterator[PolisherBatch]:
            for image_id in val_ids:
                item = dataset[index_of[image_id]]
                if item is None:
                    continue
                image, target = item
                yield teacher_batch(
                    teacher, [image.to(torch_device)], [target], [pairs.get(image_id)],
                    *caps, max_props, fg_iou, val_gen,
                )  # fmt: skip

        validation.update(evaluate_polisher(ema.module, val_batches()))
    result = PolisherResult(cfg.iters, seconds, last, len(train_ids), len(val_ids), validation)
    if dist.is_main:
        extra = {
            "validation": validation,
            "iterations": cfg.iters,
            "last_losses": last,
            "config": pcfg,
            "noise": noise_meta.get("noise", {}),
            "noise_file": str(noise_path),
            "ann": str(ann),
            "ema_momentum": ema.momentum,
        }
        save_polisher(out, ema.module, teacher_path, spec.categories, extra=extra)
        if val_json is not None:
            write_json(val_json, validation, indent=2)
    return ema.module, result
