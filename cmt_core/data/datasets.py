"""Map-style data sets: samples read by index, so a data set need not fit in memory.

A ``Dataset`` answers ``read(indices) -> (n, *sample_shape)`` float32 samples in the model's space (images in
[-1, 1] as ``(C, H, W)``, 2-D points as ``(2,)``) and, when it has classes (``num_classes > 0``),
``labels(indices) -> (n,)`` int64. ``ds[a:b]`` and ``ds[index_tensor]`` read too; ``subset(indices)`` is a
view (the train / held-out split), ``batches(size)`` reads it in order.

* ``TensorDataset``: samples (and labels) held in memory: the embedded digits, CIFAR-10, an ``.npz``, 2-D data.
* ``ImageFolderDataset``: image files (a folder or a zip archive) decoded when read; only their names, headers and
  labels are held.

Labels that do not fit ``DataConfig.num_classes`` (missing, malformed, outside [0, num_classes)) raise
``ClassLabelError``, one sentence naming the field and where the labels come from.

Training reads data sets through ``cmt_core.data.sources.DatasetSource`` and its ``EpochSampler`` (an infinite,
seeded order of every sample, edm2's ``InfiniteSampler`` drawn from the named rng streams).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def as_indices(index, size: int) -> torch.Tensor:
    """A slice, an int sequence or an index tensor as an int64 tensor of positions in ``[0, size)``."""
    if isinstance(index, slice):
        return torch.arange(size)[index]
    idx = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
    if idx.numel() and (int(idx.min()) < -size or int(idx.max()) >= size):
        raise IndexError(f"indices must lie in [0, {size}), got {int(idx.min())}..{int(idx.max())}")
    return idx % max(size, 1)


class ClassLabelError(ValueError):
    """The data's class labels do not fit ``data.num_classes``: the message names the field and the source."""


def labels_error(num_classes: int, problem: str) -> ClassLabelError:
    """``data.num_classes=N asks for class labels, but <problem>``."""
    return ClassLabelError(f"data.num_classes={num_classes} asks for class labels, but {problem}")


def check_labels(labels: torch.Tensor, num_classes: int, source: str) -> torch.Tensor:
    """``labels`` ``(N,)`` int64, or ``ClassLabelError`` unless every one lies in ``[0, num_classes)``; ``source``
    names them (``"the labels of <file>"``)."""
    if labels.numel() and int(labels.min()) < 0:
        raise ClassLabelError(f"data.num_classes={num_classes}, but {source} go down to {int(labels.min())} (they "
                              f"must lie in [0, {num_classes}))")
    if labels.numel() and int(labels.max()) >= num_classes:
        raise ClassLabelError(f"data.num_classes={num_classes}, but {source} reach {int(labels.max())} (they must "
                              f"lie in [0, {num_classes}))")
    return labels


class Dataset:
    """Base of the data sets: subclasses define ``__len__``, ``_read`` and, with classes, ``class_labels`` ``(N,)``
    int64 (or their own ``_labels``)."""

    sample_shape: tuple[int, ...]
    num_classes: int = 0  # 0: the data set has no class labels
    class_labels: torch.Tensor | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def _read(self, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _labels(self, idx: torch.Tensor) -> torch.Tensor:
        if self.class_labels is None:
            raise ValueError(f"{type(self).__name__} has no class labels")
        return self.class_labels[idx]

    def read(self, indices) -> torch.Tensor:
        """Samples ``(n, *sample_shape)`` float32 at ``indices`` (any order, repeats allowed)."""
        return self._read(as_indices(indices, len(self)))

    def labels(self, indices) -> torch.Tensor:
        """Class labels ``(n,)`` int64 at ``indices``; raises ``ValueError`` for a data set without classes."""
        return self._labels(as_indices(indices, len(self)))

    def __getitem__(self, index) -> torch.Tensor:
        return self.read(index)

    def subset(self, indices) -> Subset:
        return Subset(self, as_indices(indices, len(self)))

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Every sample in order, ``batch_size`` at a time."""
        for start in range(0, len(self), batch_size):
            yield self.read(slice(start, start + batch_size))

    def all(self) -> torch.Tensor:
        """Every sample ``(len, *sample_shape)`` (in memory: for small data sets and tests)."""
        return self.read(slice(None))


class TensorDataset(Dataset):
    """Samples ``(N, *shape)`` (and labels ``(N,)`` int64 with ``num_classes`` classes) held in memory."""

    def __init__(self, samples: torch.Tensor, labels: torch.Tensor | None = None, num_classes: int = 0):
        if labels is not None and len(labels) != len(samples):
            raise ValueError(f"{len(labels)} labels for {len(samples)} samples")
        self.samples, self.class_labels = samples, labels
        self.sample_shape = tuple(samples.shape[1:])
        self.num_classes = num_classes if labels is not None else 0

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, idx: torch.Tensor) -> torch.Tensor:
        return self.samples[idx]


class Subset(Dataset):
    """The samples ``indices`` of ``base``, in that order (a view: nothing is read until asked)."""

    def __init__(self, base: Dataset, indices: torch.Tensor):
        self.base, self.indices = base, indices
        self.sample_shape, self.num_classes = base.sample_shape, base.num_classes

    def __len__(self) -> int:
        return len(self.indices)

    def _read(self, idx: torch.Tensor) -> torch.Tensor:
        return self.base.read(self.indices[idx])

    def _labels(self, idx: torch.Tensor) -> torch.Tensor:
        return self.base.labels(self.indices[idx])
