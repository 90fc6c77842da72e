"""Joint polisher training inside the online loop (``student.online_polisher``), the
paper's form: the polishers keep learning while the EMA teacher they correct moves.

Each iteration, before the unlabeled images are labelled, the labeled images of the batch
(the student's augmented view and its truth) give the polishers one SGD step: the EMA
teacher's features of those images (``teacher_batch``, as offline), pairs drawn on the fly
around the truth with the paper's Gaussian noise (``truth_pairs``, the ``polisher``
section's copies and scales) and the offline losses (``PolisherLoss``). An EMA copy of the
polishers (``polisher.ema_momentum``, 0.99 as in the paper) is what labels the unlabeled
images; under torchrun the polishers' gradients are averaged over the processes. The state
(weights, EMA, optimizer, RNGs) is a loop hook's, so a resumed run continues it, and the
EMA polishers are saved beside the student, tied to its EMA teacher, with the keep rule
they started from: ``dpl polish --teacher <stem>.teacher.pt --polisher <stem>.polisher.pt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from dpl_tools.data.polisher_pairs import CLS, REG, PairSettings, truth_pairs
from dpl_tools.engine.ema import ModelEMA
from dpl_tools.engine.loop import Hook, TrainLoop
from dpl_tools.engine.online import ONLINE_KEY
from dpl_tools.engine.polisher_batches import ImagePairs, PolisherLoss, teacher_batch
from dpl_tools.models.polisher import Polisher, save_polisher
from dpl_tools.models.student_criterion import PSEUDO_KEY
from dpl_tools.runtime import DistInfo


def polisher_path_of(out: str | Path) -> Path:
    """Where the jointly trained polishers of an online student ``out`` are saved."""
    out = Path(out)
    return out.with_name(f"{out.stem}.polisher{out.suffix or '.pt'}")


class OnlinePolisher(Hook):
    """Trains ``polisher`` in place on each batch's labeled images (``step``) and keeps its
    EMA copy (``labeler``: what labels the unlabeled images); see the module docstring."""

    name = "online_polisher"

    def __init__(
        self,
        polisher: Polisher,
        teacher: nn.Module,
        pcfg: dict[str, Any],
        lr: float,
        dist: DistInfo,
        seed: int,
    ) -> None:
        self.net, self.teacher, self.dist = polisher.train(), teacher, dist
        self.ema = ModelEMA(polisher, pcfg["ema_momentum"])
        self.loss = PolisherLoss(polisher)
        self.optimizer = torch.optim.SGD(
            polisher.parameters(), lr=lr, momentum=pcfg["momentum"],
            weight_decay=pcfg["weight_decay"],
        )  # fmt: skip
        self.pairs = PairSettings.from_section(pcfg)
        self.caps = (pcfg["reg_per_image"], pcfg["cls_per_image"])
        self.max_proposals, self.fg_iou = pcfg["max_proposals"], pcfg["fg_iou"]
        self.clip = pcfg["clip_grad_norm"]
        self.rng = np.random.default_rng([seed, dist.rank])  # the pairs
        self.generator = torch.Generator().manual_seed(seed + dist.rank)  # pair sampling
        self.sums: dict[str, float] = {}  # losses since the last ``take_losses``
        self.steps = 0

    @property
    def labeler(self) -> Polisher:
        """The polishers that label: the EMA copy."""
        return self.ema.module

    def _pairs(self, target: dict) -> ImagePairs:
        drawn = truth_pairs(target["boxes"].detach().cpu().numpy(),
                            target["labels"].cpu().numpy(), self.pairs, self.rng)  # fmt: skip
        (reg_boxes, reg_targets, _), (cls_boxes, _, cls_labels) = drawn[REG], drawn[CLS]
        return ImagePairs(reg_boxes, reg_targets, cls_boxes, cls_labels)

    def step(self, images: list[torch.Tensor], targets: list[dict]) -> None:
        """One SGD step of the polishers on the labeled images of a batch (those with
        truth: not yet labelled online, not pseudo-labelled), with the EMA teacher's
        features; no step on any process when none had such an image."""
        chosen = [i for i, t in enumerate(targets)
                  if ONLINE_KEY not in t and not t.get(PSEUDO_KEY) and len(t["boxes"])]  # fmt: skip
        params = [p for p in self.net.parameters() if p.requires_grad]
        for p in params:  # zeros, not None: every process reduces the same tensors
            p.grad = torch.zeros_like(p)
        found = torch.tensor([float(len(chosen))])
        if chosen:
            batch = teacher_batch(
                self.teacher, [images[i] for i in chosen], [targets[i] for i in chosen],
                [self._pairs(targets[i]) for i in chosen], *self.caps, self.max_proposals,
                self.fg_iou, self.generator,
            )  # fmt: skip
            with torch.autocast(images[0].device.type, enabled=False):
                losses = self.loss(batch)
            sum(losses.values()).backward()
            for k, v in losses.items():
                self.sums[k] = self.sums.get(k, 0.0) + float(v.detach())
            self.steps += 1
        if self.dist.enabled:  # the mean gradient over the processes, as DDP would give
            flat = torch.cat([p.grad.reshape(-1) for p in params] + [found.to(params[0].device)])
            torch_dist.all_reduce(flat)
            found = flat[-1].cpu()
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p) / self.dist.world_size)
                offset += p.numel()
        if float(found) == 0:
            return
        if self.clip:
            nn.utils.clip_grad_norm_(params, self.clip)
        self.optimizer.step()
        self.ema.update(self.net)

    def take_losses(self) -> dict[str, float | None]:
        """The polishers' mean losses since the last call (for the online log)."""
        mean = {f"polisher_{k}": round(v / self.steps, 4) for k, v in self.sums.items()}
        self.sums, self.steps = {}, 0
        return mean or {"polisher_reg": None, "polisher_cls": None}

    def state_dict(self) -> dict:
        return {"model": self.net.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "sums": dict(self.sums),
                "steps": self.steps}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["model"])
        self.ema.module.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sums, self.steps = dict(state["sums"]), state["steps"]
        if "rng" in state:  # a checkpoint written before the random states were per rank
            self.load_random_state(state)

    def random_state(self) -> dict:
        """The pairs' generators: each rank draws its own."""
        return {"rng": self.rng.bit_generator.state, "generator": self.generator.get_state()}

    def load_random_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.generator.set_state(state["generator"])


class SaveOnlinePolisher(Hook):
    """At the end of training (rank 0), save the EMA polishers tied to the EMA teacher
    file (run after ``SaveEMATeacher``), with the keep rule and noise they started from."""

    def __init__(
        self, trainer: OnlinePolisher, started: Polisher, teacher_file: Path, out: Path,
        extra: dict[str, Any],
    ) -> None:  # fmt: skip
        self.trainer, self.teacher_file, self.out = trainer, teacher_file, out
        self.extra = {"keep_thresholds": started.fitted_thresholds, "noise": started.noise,
                      "regression_check": started.regression_check, **extra}  # fmt: skip
        self.categories = started.categories

    def after_train(self, loop: TrainLoop) -> None:
        if loop.finished and loop.dist.is_main:
            extra = {**self.extra, "iterations": loop.iteration}
            save_polisher(self.out, self.trainer.labeler, self.teacher_file, self.categories,
                          extra)  # fmt: skip
