"""The EMA a training run keeps: exponential, ``ema = decay * ema + (1 - decay) * param`` (``EMA``), or
power-function EMAs of several relative stds (``cmt_core.phema.PowerFunctionEMA``); ``make_ema`` picks one.

Both have ``model`` (the EMA model a run scores and returns: for power-function EMAs, the one of the first std)
and ``update(model, step)``, called after optimisation step ``step`` (>= 1, the number of steps taken)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from cmt_core.phema import PowerFunctionEMA


class EMA:
    """A frozen copy of ``model`` (eval mode) that follows its parameters; buffers are copied as they are."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """``step`` is not used: an exponential EMA decays the same at every step."""
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - self.decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


def make_ema(model: nn.Module, decay: float, stds: Sequence[float] = ()) -> EMA | PowerFunctionEMA:
    """``EMA(model, decay)`` without ``stds``; else ``PowerFunctionEMA(model, stds)`` (``decay`` unused)."""
    return PowerFunctionEMA(model, stds) if stds else EMA(model, decay)
