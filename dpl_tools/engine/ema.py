"""An exponential moving average (EMA) copy of a model's weights.

After each optimizer step, ``ema = momentum * ema + (1 - momentum) * weights`` for every
floating-point parameter and buffer (other buffers are copied). The polishers are trained
with momentum 0.99 and the EMA copy is the one saved and used for polishing.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """Keeps ``self.module``, a frozen deep copy of ``model`` updated by ``update(model)``."""

    def __init__(self, model: nn.Module, momentum: float = 0.99) -> None:
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.module = copy.deepcopy(getattr(model, "module", model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the EMA weights towards ``model``'s (a DDP wrapper is unwrapped)."""
        current = getattr(model, "module", model).state_dict()
        for name, ema_value in self.module.state_dict().items():
            value = current[name].detach()
            if ema_value.dtype.is_floating_point:
                ema_value.mul_(self.momentum).add_(
                    value.to(ema_value.dtype), alpha=1 - self.momentum
                )
            else:
                ema_value.copy_(value)

    def state_dict(self) -> dict:
        return self.module.state_dict()
