"""A reusable detector training loop, and the teacher's training on labeled images.

``train_detector`` runs SGD with linear warm-up and step decay, gradient clipping, AMP on
GPU, DDP under torchrun (each rank reads its DistributedSampler shard, rank 0 writes the
checkpoints) and a rich progress bar with loss and ETA. The per-batch loss is pluggable
(``loss_fn(model, images, targets) -> dict of losses``), so the student reuses the loop.
Resuming restores weights, optimizer, RNG and the position in the data stream, so a
resumed CPU run ends with the same weights as an uninterrupted one (with ``workers=0``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from dpl_tools.data.coco import load_coco
from dpl_tools.data.detection import DetectionDataset, collate_detection
from dpl_tools.errors import DplError
from dpl_tools.models.checkpoint import (
    DetectorSpec,
    detector_from_checkpoint,
    read_checkpoint,
    save_detector,
    unwrap,
)
from dpl_tools.models.detector import build_detector, multiscale_sizes
from dpl_tools.runtime import (
    DistInfo,
    amp_enabled,
    init_distributed,
    resolve_device,
    seed_everything,
)

LossFn = Callable[[nn.Module, list, list], dict[str, torch.Tensor]]
SaveFn = Callable[[nn.Module, dict, bool], None]


@dataclass
class TrainConfig:
    """Optimisation settings (the ``teacher`` / ``student`` config sections)."""

    iters: int = 400
    batch_size: int = 2
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0001
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    lr_steps: list[float] = field(default_factory=lambda: [0.667, 0.889])
    gamma: float = 0.1
    clip_grad_norm: float | None = 10.0
    workers: int = 2
    checkpoint_every: int = 100
    seed: int = 0
    find_unused_parameters: bool = False

    @classmethod
    def from_section(cls, section: dict[str, Any], **overrides: Any) -> TrainConfig:
        """Pick this dataclass's keys out of a config section (other keys ignored)."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in {**section, **overrides}.items() if k in names}
        return cls(**values)

    def lr_at(self, iteration: int) -> float:
        """Learning rate at ``iteration``: linear warm-up, then x gamma at each step."""
        lr = self.lr * self.gamma ** sum(iteration >= f * self.iters for f in self.lr_steps)
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            lr *= self.warmup_factor * (1 - alpha) + alpha
        return lr


@dataclass
class TrainResult:
    """What a training run did: iterations run (total, and in this process), time, speed."""

    iterations: int
    iterations_run: int
    seconds: float
    images_per_s: float
    last_loss: float


def detector_losses(model: nn.Module, images: list, targets: list) -> dict[str, torch.Tensor]:
    """The default loss: torchvision's Faster R-CNN losses (RPN + RoI head)."""
    return model(images, targets)


class StreamSampler(Sampler[int]):
    """An endless stream of this rank's DistributedSampler shards, epoch after epoch,
    starting ``start`` samples in (so a resumed run reads exactly what it would have)."""

    def __init__(self, dataset: Dataset, dist: DistInfo, seed: int, start: int = 0) -> None:
        self.shards = DistributedSampler(
            dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed
        )
        self.start = start

    def __iter__(self) -> Iterator[int]:
        per_epoch = len(self.shards)
        epoch, offset = divmod(self.start, per_epoch)
        while True:
            self.shards.set_epoch(epoch)
            yield from list(self.shards)[offset:]
            epoch, offset = epoch + 1, 0


def _to_device(targets: list[dict], device: torch.device) -> list[dict]:
    return [
        {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
        for t in targets
    ]


def _progress(console: Console | None, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}  lr {task.fields[lr]:.2e}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    params: list,
    cfg: TrainConfig,
    iteration: int,
) -> float:
    """One (AMP-scaled, gradient-clipped) SGD step; a non-finite loss is a clear error.

    Shared by every training loop (detector, student, polisher); returns the loss value.
    """
    loss_value = float(loss.detach())
    if not math.isfinite(loss_value):
        raise DplError(
            f"training diverged: loss is {loss_value} at iteration {iteration + 1} "
            f"(try a lower --lr than {cfg.lr})"
        )
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.clip_grad_norm:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    return loss_value


def checkpoint_saver(out: str | Path, spec: DetectorSpec, seed: int) -> SaveFn:
    """The ``save`` callback of ``train_detector``: periodic checkpoints go to
    ``<out stem>.last.pt``, the final one to ``out`` (and the periodic one is removed)."""

    def save(net: nn.Module, state: dict, final: bool) -> None:
        state = {**state, "seed": seed}
        save_detector(out if final else last_checkpoint_path(out), unwrap(net), spec, state)
        if final:
            last_checkpoint_path(out).unlink(missing_ok=True)

    return save


def train_detector(
    model: nn.Module,
    dataset: Dataset,
    cfg: TrainConfig,
    device: torch.device,
    dist: DistInfo | None = None,
    loss_fn: LossFn = detector_losses,
    collate_fn: Callable = collate_detection,
    save: SaveFn | None = None,
    resume_state: dict | None = None,
    description: str = "training",
    console: Console | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.iters`` iterations (minus those already done in
    ``resume_state``). ``save(model, train_state, final)`` is called on rank 0 every
    ``cfg.checkpoint_every`` iterations and at the end."""
    dist = dist or DistInfo()
    if len(dataset) == 0:
        raise DplError("no training images")
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    use_amp = amp_enabled(device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start = 0
    if resume_state:
        start = int(resume_state["iteration"])
        optimizer.load_state_dict(resume_state["optimizer"])
        if resume_state.get("scaler") and use_amp:
            scaler.load_state_dict(resume_state["scaler"])
        if resume_state.get("rng") is not None:
            torch.set_rng_state(resume_state["rng"])
    net = model
    if dist.enabled:
        net = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters,
        )
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=StreamSampler(dataset, dist, cfg.seed, start * cfg.batch_size),
        collate_fn=collate_fn,
        num_workers=cfg.workers,
        generator=torch.Generator().manual_seed(cfg.seed + dist.rank),
        pin_memory=device.type == "cuda",
    )

    previous_s = float(resume_state.get("elapsed_s", 0.0)) if resume_state else 0.0

    def train_state(iteration: int) -> dict:
        return {
            "iteration": iteration,
            "elapsed_s": previous_s + time.perf_counter() - began,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if use_amp else None,
            "rng": torch.get_rng_state(),
            "config": {f.name: getattr(cfg, f.name) for f in fields(cfg)},
        }

    batches = iter(loader)
    loss_value = math.nan
    began = time.perf_counter()
    with _progress(console, dist.is_main) as progress:
        task = progress.add_task(
            description, total=cfg.iters, completed=start, loss=math.nan, lr=cfg.lr_at(start)
        )
        for iteration in range(start, cfg.iters):
            images, targets = next(batches)
            if not images:
                continue
            lr = cfg.lr_at(iteration)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = [image.to(device, non_blocking=True) for image in images]
            targets = _to_device(targets, device)
            with torch.autocast(device.type, enabled=use_amp):
                losses = loss_fn(net, images, targets)
            loss = sum(losses.values())
            loss_value = optimizer_step(loss, optimizer, scaler, params, cfg, iteration)
            done = iteration + 1
            progress.update(task, completed=done, loss=loss_value, lr=lr)
            periodic = cfg.checkpoint_every and done % cfg.checkpoint_every == 0
            if save and dist.is_main and periodic and done < cfg.iters:
                save(model, train_state(done), False)
    seconds = time.perf_counter() - began
    run = max(cfg.iters - start, 0)
    if save and dist.is_main:
        save(model, train_state(max(cfg.iters, start)), True)
    model.eval()
    return TrainResult(
        iterations=max(cfg.iters, start),
        iterations_run=run,
        seconds=seconds,
        images_per_s=run * cfg.batch_size * dist.world_size / seconds if seconds > 0 else 0.0,
        last_loss=loss_value,
    )


def last_checkpoint_path(out: str | Path) -> Path:
    """Where periodic checkpoints of a run writing ``out`` go (``teacher.last.pt``)."""
    out = Path(out)
    return out.with_name(f"{out.stem}.last{out.suffix or '.pt'}")


def find_resume_checkpoint(out: str | Path) -> dict | None:
    """The most advanced of ``out`` and its periodic checkpoint, as a raw dict (or None)."""
    candidates = [read_checkpoint(p) for p in (out, last_checkpoint_path(out)) if Path(p).is_file()]
    candidates = [c for c in candidates if c.get("train_state")]
    if not candidates:
        return None
    return max(candidates, key=lambda c: c["train_state"]["iteration"])


def train_teacher(
    ann: str | Path,
    images_dir: str | Path,
    out: str | Path,
    config: dict[str, Any],
    device: str = "auto",
    seed: int = 0,
    resume: bool = False,
    console: Console | None = None,
) -> tuple[nn.Module, DetectorSpec, TrainResult]:
    """Train a teacher detector on a labeled COCO set and save it to ``out``; returns the
    trained model (eval mode), its spec and the run's numbers.

    ``config`` has ``model`` and ``teacher`` sections (see ``dpl_tools.config``).
    """
    console = console or Console()
    torch_device = resolve_device(device)
    dist = init_distributed(torch_device)
    mcfg, tcfg = config["model"], config["teacher"]
    cfg = TrainConfig.from_section(tcfg, seed=seed)
    coco = load_coco(ann, images_dir)
    if dist.is_main:
        for line in coco.report.lines():
            console.print(f"[yellow]warning:[/] {line}", highlight=False)
    if not coco.images:
        raise DplError(f"{ann}: no images to train on")
    if not coco.annotations:
        raise DplError(f"{ann}: no boxes to train on")

    resume_ckpt = find_resume_checkpoint(out) if resume else None
    if resume and resume_ckpt is None and dist.is_main:
        console.print(f"no checkpoint to resume at {out}; starting from scratch")
    seed_everything(seed)
    if resume_ckpt is not None:
        model, spec = detector_from_checkpoint(resume_ckpt, out, tcfg.get("multiscale"))
        if [c["id"] for c in spec.categories] != [c["id"] for c in coco.categories]:
            raise DplError(f"{out}: checkpoint classes differ from {ann}; cannot resume")
    else:
        spec = DetectorSpec(
            arch=mcfg["arch"],
            categories=coco.categories,
            min_size=int(mcfg["min_size"]),
            max_size=int(mcfg["max_size"]),
            kind="teacher",
            extra={"backbone_weights": str(mcfg["backbone_weights"]), "train_ann": str(ann)},
        )
        model = build_detector(
            spec.arch,
            spec.num_classes,
            str(mcfg["backbone_weights"]),
            multiscale_sizes(spec.min_size, tcfg.get("multiscale")),
            spec.max_size,
            **dict(mcfg.get("detector_kwargs") or {}),
        )
    spec.extra["config"] = config
    seed_everything(seed + dist.rank)
    dataset = DetectionDataset(coco, images_dir, train=bool(tcfg.get("hflip", True)))

    save = checkpoint_saver(out, spec, seed)
    result = train_detector(
        model,
        dataset,
        cfg,
        torch_device,
        dist,
        save=save,
        resume_state=resume_ckpt["train_state"] if resume_ckpt else None,
        description="train-teacher",
        console=console,
    )
    return model, spec, result
