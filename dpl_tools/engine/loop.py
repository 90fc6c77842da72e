"""The one training loop of dpl: the teacher, the student and the polishers all run it.

``TrainLoop`` follows detectron2's ``TrainerBase``: each iteration fetches a batch from an
endless seeded stream (``StreamSampler``), calls every hook's ``before_step``, runs
``run_step`` (the loss under autocast, then one AMP-scaled, gradient-clipped SGD step) and
every hook's ``after_step``. The learning-rate schedule (linear warm-up, step decay), the
EMA copy, checkpoints and the progress bar are hooks. The loop also owns the DDP wrap
(under torchrun each rank reads its own shard) and resume: a training state holds the
iteration, optimizer, GradScaler, the hooks' states and every rank's random state (each
rank draws its own), and the data stream restarts at the sample where it stopped, so a
resumed CPU run (``workers=0``) ends with the same weights as an uninterrupted one, on one
process or several; a resume with another seed, batch size or process count is refused.
``train`` builds the usual hooks and runs a loop.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from dpl_tools.data.detection import collate_detection
from dpl_tools.defaults import DEFAULTS
from dpl_tools.engine.ema import ModelEMA
from dpl_tools.errors import DplError
from dpl_tools.io import clean_stale_temps
from dpl_tools.outputs import output_lock
from dpl_tools.progress import Progress
from dpl_tools.runtime import DistInfo, amp_enabled
from dpl_tools.settings import settings_from_section

_TEACHER = DEFAULTS["teacher"]
# loss_fn(model, images, targets) -> named losses (summed for the step); model may be DDP.
LossFn = Callable[[nn.Module, list, list], dict[str, torch.Tensor]]
# save(model, train_state, final): write a checkpoint (called on rank 0 only).
SaveFn = Callable[[nn.Module, dict, bool], None]


@dataclass
class TrainConfig:
    """Optimisation settings (the ``teacher`` / ``student`` / ``polisher`` config sections;
    defaults: the ``teacher`` section of ``dpl_tools.defaults``)."""

    iters: int = _TEACHER["iters"]
    batch_size: int = _TEACHER["batch_size"]
    lr: float = _TEACHER["lr"]
    momentum: float = _TEACHER["momentum"]
    weight_decay: float = _TEACHER["weight_decay"]
    warmup_iters: int = _TEACHER["warmup_iters"]
    warmup_factor: float = _TEACHER["warmup_factor"]
    lr_steps: list[float] = field(default_factory=lambda: list(_TEACHER["lr_steps"]))
    gamma: float = _TEACHER["gamma"]
    clip_grad_norm: float | None = _TEACHER["clip_grad_norm"]
    workers: int = _TEACHER["workers"]
    checkpoint_every: int = _TEACHER["checkpoint_every"]
    seed: int = 0  # set per run (the command's --seed)
    find_unused_parameters: bool = _TEACHER["find_unused_parameters"]

    @classmethod
    def from_section(cls, section: dict[str, Any], **overrides: Any) -> TrainConfig:
        """Pick this dataclass's keys out of a config section (other keys ignored)."""
        return settings_from_section(cls, section, **overrides)

    def lr_at(self, iteration: int) -> float:
        """Learning rate at ``iteration``: linear warm-up, then x gamma at each step."""
        lr = self.lr * self.gamma ** sum(iteration >= f * self.iters for f in self.lr_steps)
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            lr *= self.warmup_factor * (1 - alpha) + alpha
        return lr


@dataclass
class TrainResult:
    """What a training run did: iterations run (total, and in this process), time, speed,
    and the losses of the last step (their sum, and by name)."""

    iterations: int
    iterations_run: int
    seconds: float
    images_per_s: float
    last_loss: float
    last_losses: dict[str, float] = field(default_factory=dict)


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


def to_device(targets: list[dict], device: torch.device) -> list[dict]:
    """The targets with their tensors moved to ``device`` (other values kept)."""
    return [
        {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
        for t in targets
    ]


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    params: list,
    cfg: TrainConfig,
    iteration: int,
) -> float:
    """One (AMP-scaled, gradient-clipped) SGD step; a non-finite loss is a clear error.
    Returns the loss value."""
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


class Hook:
    """Something run around training and each step (detectron2's ``HookBase``). A hook
    with state to resume returns it from ``state_dict`` (kept under ``name``)."""

    name = ""

    def before_train(self, loop: TrainLoop) -> None:
        """Before the first iteration of this run."""

    def before_step(self, loop: TrainLoop) -> None:
        """Before ``run_step`` of ``loop.iteration`` (its batch is fetched)."""

    def after_step(self, loop: TrainLoop) -> None:
        """After the optimizer step of ``loop.iteration``."""

    def after_train(self, loop: TrainLoop) -> None:
        """After training, also when it failed (``loop.finished`` says which)."""

    def state_dict(self) -> dict | None:
        """What a resumed run needs to continue this hook (None: nothing)."""
        return None

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""

    def random_state(self) -> Any:
        """This process's own random state of the hook (None: none); kept per rank."""
        return None

    def load_random_state(self, state: Any) -> None:
        """Restore what ``random_state`` returned on this rank."""


class TrainLoop:
    """SGD on ``model`` for ``cfg.iters`` iterations over ``dataset`` (see module doc).

    ``loss_fn(net, images, targets)`` gives the named losses of a batch (``net`` is the
    DDP-wrapped model under torchrun); ``generators`` are extra seeded RNGs (e.g. pair
    sampling) whose state a training state saves; ``resume_state`` continues a run.
    """

    def __init__(
        self,
        model: nn.Module,
        dataset: Dataset,
        cfg: TrainConfig,
        device: torch.device,
        dist: DistInfo | None = None,
        loss_fn: LossFn | None = None,
        collate_fn: Callable = collate_detection,
        hooks: Sequence[Hook] = (),
        generators: dict[str, torch.Generator] | None = None,
        resume_state: dict | None = None,
    ) -> None:
        if len(dataset) == 0:
            raise DplError("no training images")
        self.cfg, self.device, self.dist = cfg, device, dist or DistInfo()
        self.model = model.to(device).train()
        self.loss_fn = loss_fn or (lambda net, images, targets: net(images, targets))
        self.hooks = list(hooks)
        self.generators = dict(generators or {})
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(
            self.params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.use_amp = amp_enabled(device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.start, self.previous_s = 0, 0.0
        self.iteration, self.finished = 0, False
        self.lr = cfg.lr_at(0)
        self.last_loss, self.last_losses = math.nan, {}
        if resume_state:
            self.load_state(resume_state)
        self.net = model
        if self.dist.enabled:
            self.net = DistributedDataParallel(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters,
            )
        self.loader = DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            sampler=StreamSampler(dataset, self.dist, cfg.seed, self.start * cfg.batch_size),
            collate_fn=collate_fn,
            num_workers=cfg.workers,
            # the workers' seeds; a resumed run (start > 0) draws new ones rather than
            # replaying the first iterations' augmentation (exact only with workers=0)
            generator=torch.Generator().manual_seed(
                cfg.seed + self.dist.rank + 1_000_003 * self.start
            ),
            pin_memory=device.type == "cuda",
        )

    def load_state(self, state: dict) -> None:
        """Continue from a training state (``train_state``): iteration, optimizer, scaler,
        RNGs and hooks. The model's weights are the caller's to load."""
        saved = state.get("config") or {}
        for key in ("seed", "batch_size"):  # the data stream continues where it stopped
            if key in saved and saved[key] != getattr(self.cfg, key):
                raise DplError(
                    f"--resume: the interrupted run used {key} {saved[key]}, this one "
                    f"{getattr(self.cfg, key)}; resume with the same, or start without --resume"
                )
        self.start = self.iteration = int(state["iteration"])
        self.previous_s = float(state.get("elapsed_s", 0.0))
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") and self.use_amp:
            self.scaler.load_state_dict(state["scaler"])
        hook_states = state.get("hooks") or {}
        for hook in self.hooks:
            if hook.name in hook_states:
                hook.load_state_dict(hook_states[hook.name])
        ranks = state.get("ranks") or [state]  # one random state per rank (``train_state``)
        if len(ranks) != self.dist.world_size:
            raise DplError(
                f"--resume: the interrupted run had {len(ranks)} process(es), this one has "
                f"{self.dist.world_size}; resume with as many, or start without --resume"
            )
        self._load_random_state(ranks[self.dist.rank])
        self.last_loss = float(state.get("last_loss", math.nan))
        self.last_losses = dict(state.get("last_losses") or {})
        self.lr = self.cfg.lr_at(self.start)

    def random_state(self) -> dict:
        """This process's random state: torch's CPU (and CUDA) generator, the extra
        generators and the hooks' own. Each rank draws its own numbers (seeded seed + rank),
        so a checkpoint keeps one per rank (``gather_random_states``)."""
        hooks = {h.name: h.random_state() for h in self.hooks}
        return {
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device)
            if self.device.type == "cuda"
            else None,
            "generators": {name: g.get_state() for name, g in self.generators.items()},
            "hook_random": {name: r for name, r in hooks.items() if r is not None},
        }

    def _load_random_state(self, state: dict) -> None:
        if state.get("rng") is not None:
            torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        for name, generator_state in (state.get("generators") or {}).items():
            self.generators[name].set_state(generator_state)
        hook_random = state.get("hook_random") or {}
        for hook in self.hooks:
            if hook.name in hook_random:
                hook.load_random_state(hook_random[hook.name])

    def gather_random_states(self) -> list[dict] | None:
        """Every rank's ``random_state``, in rank order, under torchrun (a collective: all
        ranks call it); None on one process."""
        if not self.dist.enabled:
            return None
        import torch.distributed as torch_dist

        ranks: list[Any] = [None] * self.dist.world_size
        torch_dist.all_gather_object(ranks, self.random_state())
        return ranks

    def train_state(self, iteration: int | None = None, ranks: list[dict] | None = None) -> dict:
        """Everything a resumed run needs besides the weights (see ``load_state``): this
        process's random state, or each rank's when ``ranks`` (``gather_random_states``)
        is given."""
        hook_states = {h.name: h.state_dict() for h in self.hooks}
        return {
            "iteration": self.iteration if iteration is None else iteration,
            "elapsed_s": self.previous_s + time.perf_counter() - self.began,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.use_amp else None,
            **self.random_state(),
            "ranks": ranks,
            "hooks": {name: s for name, s in hook_states.items() if s is not None},
            "last_loss": self.last_loss,
            "last_losses": dict(self.last_losses),
            "config": {f.name: getattr(self.cfg, f.name) for f in fields(self.cfg)},
        }

    def run_step(self, images: list, targets: list) -> None:
        """Losses of one batch (autocast on GPU), then the optimizer step."""
        images = [image.to(self.device, non_blocking=True) for image in images]
        targets = to_device(targets, self.device)
        with torch.autocast(self.device.type, enabled=self.use_amp):
            losses = self.loss_fn(self.net, images, targets)
        loss = sum(losses.values())
        self.last_loss = optimizer_step(
            loss, self.optimizer, self.scaler, self.params, self.cfg, self.iteration
        )
        self.last_losses = {k: float(v.detach()) for k, v in losses.items()}

    def run(self) -> TrainResult:
        """Train from the current iteration to ``cfg.iters``; an empty batch (every image
        unreadable) skips its iteration."""
        batches = iter(self.loader)
        self.began = time.perf_counter()
        for hook in self.hooks:
            hook.before_train(self)
        try:
            for iteration in range(self.start, self.cfg.iters):
                self.iteration = iteration
                images, targets = next(batches)
                if not images:
                    continue
                for hook in self.hooks:
                    hook.before_step(self)
                self.run_step(images, targets)
                for hook in self.hooks:
                    hook.after_step(self)
            self.iteration = max(self.cfg.iters, self.start)
            self.finished = True
        finally:
            seconds = time.perf_counter() - self.began
            for hook in self.hooks:
                hook.after_train(self)
        self.model.eval()
        run = max(self.cfg.iters - self.start, 0)
        images = run * self.cfg.batch_size * self.dist.world_size
        return TrainResult(
            iterations=self.iteration,
            iterations_run=run,
            seconds=seconds,
            images_per_s=images / seconds if seconds > 0 else 0.0,
            last_loss=self.last_loss,
            last_losses=dict(self.last_losses),
        )


class LRSchedule(Hook):
    """Sets the learning rate of every step: ``cfg.lr_at(iteration)``."""

    def before_step(self, loop: TrainLoop) -> None:
        loop.lr = loop.cfg.lr_at(loop.iteration)
        for group in loop.optimizer.param_groups:
            group["lr"] = loop.lr


class EMAHook(Hook):
    """Moves ``ema`` towards ``model``'s weights after every step (resumable)."""

    name = "ema"

    def __init__(self, ema: ModelEMA, model: nn.Module) -> None:
        self.ema, self.model = ema, model

    def after_step(self, loop: TrainLoop) -> None:
        self.ema.update(self.model)

    def state_dict(self) -> dict:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ema.module.load_state_dict(state)


class Checkpointer(Hook):
    """``save(model, train_state, final)`` on rank 0: every ``every`` iterations (0: never)
    and once after the last one. Every rank takes part (their random states are gathered
    into the checkpoint), rank 0 writes."""

    def __init__(self, save: SaveFn, every: int) -> None:
        self.save, self.every = save, every

    def _save(self, loop: TrainLoop, iteration: int | None, final: bool) -> None:
        ranks = loop.gather_random_states()
        if loop.dist.is_main:
            self.save(loop.model, loop.train_state(iteration, ranks), final)

    def after_step(self, loop: TrainLoop) -> None:
        done = loop.iteration + 1
        if self.every and done % self.every == 0 and done < loop.cfg.iters:
            self._save(loop, done, False)

    def after_train(self, loop: TrainLoop) -> None:
        if loop.finished:
            self._save(loop, None, True)


class ProgressBar(Hook):
    """A rich progress bar on rank 0: iteration, the losses (``parts`` by name, else
    their sum), the learning rate, elapsed time and ETA."""

    def __init__(
        self, description: str, console: Console | None = None, parts: Sequence[str] = ()
    ) -> None:
        self.description, self.console, self.parts = description, console, tuple(parts)

    def _status(self, loop: TrainLoop) -> str:
        if self.parts:
            values = [f"{k} {loop.last_losses.get(k, math.nan):.3f}" for k in self.parts]
        else:
            values = [f"loss {loop.last_loss:.3f}"]
        return "  ".join([*values, f"lr {loop.lr:.2e}"])

    def before_train(self, loop: TrainLoop) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not loop.dist.is_main,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            self.description, total=loop.cfg.iters, completed=loop.start, status=self._status(loop)
        )

    def after_step(self, loop: TrainLoop) -> None:
        self.progress.update(self.task, completed=loop.iteration + 1, status=self._status(loop))

    def after_train(self, loop: TrainLoop) -> None:
        self.progress.stop()


def train(
    model: nn.Module,
    dataset: Dataset,
    cfg: TrainConfig,
    device: torch.device,
    dist: DistInfo | None = None,
    loss_fn: LossFn | None = None,
    collate_fn: Callable = collate_detection,
    save: SaveFn | None = None,
    resume_state: dict | None = None,
    description: str = "training",
    console: Console | None = None,
    hooks: Sequence[Hook] = (),
    generators: dict[str, torch.Generator] | None = None,
    progress_parts: Sequence[str] = (),
    out: str | Path | None = None,
) -> TrainResult:
    """Train ``model`` in place with the standard hooks: LR schedule, then ``hooks`` (e.g.
    EMA), the progress bar and, with ``save``, checkpoints every ``cfg.checkpoint_every``
    iterations and at the end. With ``out`` (the file ``save`` writes), rank 0 holds its
    output lock throughout (see ``checkpoint_lock``)."""
    progress = ProgressBar(description, console, progress_parts)
    all_hooks: list[Hook] = [LRSchedule(), *hooks, progress]
    if save is not None:
        all_hooks.append(Checkpointer(save, cfg.checkpoint_every))
    loop = TrainLoop(
        model, dataset, cfg, device, dist, loss_fn, collate_fn, all_hooks, generators, resume_state
    )
    if out is None or not loop.dist.is_main:
        return loop.run()
    check_writable(out)  # before any iteration, not after the last
    with checkpoint_lock(out, f"dpl {description}"):
        return loop.run()


def check_writable(out: str | Path) -> None:
    """Refuse (one-line DplError naming ``out``) a checkpoint path that cannot be written:
    a folder, or one whose folder cannot be made or written (read-only, a file in the
    way): a probe file is created and removed there."""
    out = Path(out)
    if out.is_dir():
        raise DplError(f"{out}: --out is a folder; give the checkpoint file to write")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        if isinstance(e, FileExistsError | NotADirectoryError):
            reason += ": a file is where a folder is needed"
        raise DplError(f"{out}: cannot write the checkpoint there ({reason})") from None


@contextlib.contextmanager
def checkpoint_lock(out: str | Path, command: str) -> Iterator[None]:
    """Hold the output lock of ``out`` (one trainer per output; ``output_lock``) and, holding
    it, remove at once the temps that dead runs left of ``out`` and of its periodic
    checkpoint (a kill while a checkpoint was being written), whatever their age."""
    with output_lock(out, command):
        clean_stale_temps(last_checkpoint_path(out), min_age_s=0.0)
        yield


def last_checkpoint_path(out: str | Path) -> Path:
    """Where periodic checkpoints of a run writing ``out`` go (``teacher.last.pt``)."""
    out = Path(out)
    return out.with_name(f"{out.stem}.last{out.suffix or '.pt'}")


def find_resume_checkpoint(
    out: str | Path, read: Callable[[Path], dict[str, Any]] | None = None
) -> dict | None:
    """The most advanced of ``out`` and its periodic checkpoint that holds a training
    state, as a raw dict read with ``read`` (default: a detector checkpoint), or None."""
    if read is None:
        from dpl_tools.models.checkpoint import read_checkpoint

        read = read_checkpoint
    paths = [Path(p) for p in (out, last_checkpoint_path(out)) if Path(p).is_file()]
    candidates = [c for c in (read(p) for p in paths) if c.get("train_state")]
    if not candidates:
        return None
    return max(candidates, key=lambda c: c["train_state"]["iteration"])
