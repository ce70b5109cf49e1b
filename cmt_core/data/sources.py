"""Batch sources: deterministic functions of the step, so that a resumed run sees the same batches.

``source.batch(step, batch_size, rank=0, world=1) -> dict[str, Tensor]`` returns rank ``rank``'s slice
of the global batch of ``batch_size`` samples for ``step``. The data position of a run is its step; no
iterator state needs saving. Every source slices one global batch, so 1 and N ranks see the same samples.
"""

from __future__ import annotations

from typing import Protocol

import torch

from cmt_core.rng import Stream, generator


def rank_slice(batch_size: int, rank: int, world: int) -> slice:
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {world} DDP ranks")
    per = batch_size // world
    return slice(rank * per, (rank + 1) * per)


class BatchSource(Protocol):
    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]: ...


class SyntheticSource:
    """Fresh samples of a distribution each step: ``{"x": (B, *shape)}``."""

    def __init__(self, distribution, seed: int = 0):
        self.distribution, self.seed = distribution, seed

    def batch(self, step, batch_size, rank=0, world=1):
        x = self.distribution.sample(batch_size, generator(Stream.SYNTHETIC_DATA, self.seed, step))
        return {"x": x[rank_slice(batch_size, rank, world)]}


class TensorSource:
    """Epochs over aligned tensors (same first dimension), reshuffled each epoch from (seed, epoch)."""

    def __init__(self, tensors: dict[str, torch.Tensor], seed: int = 0):
        sizes = {len(v) for v in tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f"tensors must share their first dimension, got sizes {sizes}")
        self.tensors, self.seed, self.size = tensors, seed, sizes.pop()
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(self.size, generator=generator(Stream.EPOCH_ORDER, self.seed, epoch))
            self._perm_epoch = epoch
        return self._perm

    def indices(self, step: int, batch_size: int) -> torch.Tensor:
        """Global sample indices of ``step``: consecutive positions in the stream of shuffled epochs."""
        start, stop = step * batch_size, (step + 1) * batch_size
        first, last = start // self.size, (stop - 1) // self.size
        stream = torch.cat([self._permutation(e) for e in range(first, last + 1)])
        return stream[start - first * self.size: stop - first * self.size]

    def batch(self, step, batch_size, rank=0, world=1):
        idx = self.indices(step, batch_size)[rank_slice(batch_size, rank, world)]
        return {k: v[idx] for k, v in self.tensors.items()}
