"""Batch sources: deterministic functions of the step, so that a resumed run sees the same batches.

``source.batch(step, batch_size, rank=0, world=1) -> dict`` returns rank ``rank``'s slice of the global batch
of ``batch_size`` samples for ``step``: ``{"x": (B, *sample_shape), "cond": {...}}`` (``cond``: the conditioning
channel, ``cmt_core.conditioning``; empty for an unconditional run). The data position of a run is its step;
no iterator state needs saving. Every source slices one global batch, so 1 and N ranks see the same samples.

* ``DatasetSource``: a map-style data set read in the order of an ``EpochSampler``;
* ``SyntheticSource``: fresh samples of a 2-D distribution each step;
* ``LabelDropout``: another source with a fraction of its class labels replaced by the unconditional class.
"""

from __future__ import annotations

from typing import Protocol

import torch

from cmt_core import conditioning
from cmt_core.rng import Stream, generator


def rank_slice(batch_size: int, rank: int, world: int) -> slice:
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {world} DDP ranks")
    per = batch_size // world
    return slice(rank * per, (rank + 1) * per)


def move_batch(batch: dict, device) -> dict:
    """A batch (tensors and its ``cond`` mapping) on ``device``."""
    return {k: conditioning.to_device(v, device) if k == "cond" else v.to(device, non_blocking=True)
            for k, v in batch.items()}


class BatchSource(Protocol):
    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> dict: ...


class EpochSampler:
    """An infinite, seeded order of ``size`` items: epoch e is a permutation drawn from the stream ``EPOCH_ORDER``
    keyed by (seed, e); the stream of epochs is cut into consecutive batches, step k taking positions
    [k B, (k + 1) B) (edm2's ``InfiniteSampler``, as a pure function of the step)."""

    def __init__(self, size: int, seed: int = 0):
        if size < 1:
            raise ValueError("an EpochSampler needs at least one item")
        self.size, self.seed = size, seed
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(self.size, generator=generator(Stream.EPOCH_ORDER, self.seed, epoch))
            self._perm_epoch = epoch
        return self._perm

    def indices(self, step: int, batch_size: int) -> torch.Tensor:
        """Global item indices of ``step``: consecutive positions in the stream of shuffled epochs."""
        start, stop = step * batch_size, (step + 1) * batch_size
        first, last = start // self.size, (stop - 1) // self.size
        stream = torch.cat([self._permutation(e) for e in range(first, last + 1)])
        return stream[start - first * self.size: stop - first * self.size]


class DatasetSource:
    """Epochs over a map-style data set (``cmt_core.data.datasets``), reshuffled each epoch from (seed, epoch).

    ``labels``: each batch's ``cond`` holds its samples' one-hot ``class_labels`` (the data set must have classes);
    otherwise it is empty."""

    def __init__(self, dataset, seed: int = 0, labels: bool = False):
        if labels and not dataset.num_classes:
            raise ValueError("labels were asked for, but the data set has no class labels")
        self.dataset, self.labels = dataset, labels
        self.sampler = EpochSampler(len(dataset), seed)

    def batch(self, step, batch_size, rank=0, world=1):
        idx = self.sampler.indices(step, batch_size)[rank_slice(batch_size, rank, world)]
        labels = self.dataset.labels(idx) if self.labels else None
        return {"x": self.dataset.read(idx), "cond": conditioning.class_cond(labels, self.dataset.num_classes)}


class SyntheticSource:
    """Fresh samples of a distribution each step: ``{"x": (B, *shape), "cond"}``; with ``labels`` (a distribution
    with classes, ``cmt_core.data.synthetic``) each sample's class comes with it."""

    def __init__(self, distribution, seed: int = 0, labels: bool = False):
        if labels and not getattr(distribution, "num_classes", 0):
            raise ValueError("labels were asked for, but the distribution has no classes")
        self.distribution, self.seed, self.labels = distribution, seed, labels

    def batch(self, step, batch_size, rank=0, world=1):
        rows = rank_slice(batch_size, rank, world)
        g = generator(Stream.SYNTHETIC_DATA, self.seed, step)
        if not self.labels:
            return {"x": self.distribution.sample(batch_size, g)[rows], "cond": {}}
        x, labels = self.distribution.sample_labelled(batch_size, g)
        return {"x": x[rows], "cond": conditioning.class_cond(labels[rows], self.distribution.num_classes)}


class LabelDropout:
    """``source``'s batches with each sample's ``class_labels`` row replaced by the all-zero row (the
    "unconditional" class, ``cmt_core.conditioning``) with probability ``rate``, as EDM and EDM2 train a network
    for classifier-free guidance: one model learns D(x, t, c) and D(x, t, no class).

    EDM drops labels inside its network, drawing from the training process's global generator; here the mask of
    the whole global batch is drawn from the stream ``LABEL_DROPOUT`` keyed by (seed, step) and each rank keeps its
    slice, so the dropped samples are a function of the step, the same for any number of ranks and on resume. A
    batch without ``class_labels`` passes unchanged."""

    def __init__(self, source: BatchSource, rate: float, seed: int = 0):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"label dropout rate must lie in [0, 1), got {rate}")
        self.source, self.rate, self.seed = source, rate, seed

    def batch(self, step, batch_size, rank=0, world=1):
        batch = self.source.batch(step, batch_size, rank, world)
        labels = batch["cond"].get(conditioning.CLASS_LABELS)
        if labels is None or self.rate == 0:
            return batch
        dropped = torch.rand(batch_size, generator=generator(Stream.LABEL_DROPOUT, self.seed, step))
        kept = (dropped >= self.rate)[rank_slice(batch_size, rank, world)].to(labels.dtype)
        return {**batch, "cond": {**batch["cond"], conditioning.CLASS_LABELS: labels * kept[:, None]}}
