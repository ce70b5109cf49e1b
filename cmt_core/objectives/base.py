"""The objective contract shared by every training stage.

``objective(model, batch, rng) -> per-sample loss (B_local,)``. ``batch`` is this rank's slice of the
global batch (``cmt_core.data.sources``); ``rng`` draws this step's random numbers for the *global*
batch and returns this rank's rows, so one process and N DDP ranks compute the same samples.
An objective with ``uses_jvp = True`` differentiates through ``torch.func.jvp`` and is handed the bare
module (no DDP wrapper); the training loop then all-reduces its gradients itself.
"""

from __future__ import annotations

import torch

from cmt_core.data.sources import rank_slice
from cmt_core.rng import Stream, generator


class StepRandom:
    """Random numbers of one training step, identical for the same global sample on any number of ranks."""

    def __init__(self, seed: int, step: int, global_batch: int, rank: int = 0, world: int = 1,
                 device: torch.device | str = "cpu"):
        self.step = step
        self.generator = generator(Stream.OBJECTIVE, seed, step)
        self.rows = rank_slice(global_batch, rank, world)
        self.global_batch, self.device = global_batch, device

    def randn(self, *tail: int) -> torch.Tensor:
        """Standard normal ``(B_local, *tail)``."""
        return torch.randn(self.global_batch, *tail, generator=self.generator)[self.rows].to(self.device)

    def rand(self, *tail: int) -> torch.Tensor:
        """Uniform [0, 1) ``(B_local, *tail)``."""
        return torch.rand(self.global_batch, *tail, generator=self.generator)[self.rows].to(self.device)

    def seed(self) -> int:
        """A seed shared by all ranks (e.g. to give two forward passes the same dropout masks)."""
        return int(torch.randint(2**62, (1,), generator=self.generator))

