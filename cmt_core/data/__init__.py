"""Data the pipeline learns: ``load_data(cfg) -> Data``.

``Data.train`` / ``Data.heldout`` are float tensors in the model's space (images in [-1, 1] as
``(N, C, H, W)``, 2-D points as ``(N, 2)``). Synthetic distributions also carry ``distribution`` (with an
exact ``denoise``) and train on fresh samples every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cmt_core.config import DataConfig
from cmt_core.data.sources import BatchSource, SyntheticSource, TensorSource
from cmt_core.data.synthetic import Checkerboard, GaussianMixture

SYNTHETIC_TRAIN_SIZE = 50_000


@dataclass
class Data:
    name: str
    train: torch.Tensor
    heldout: torch.Tensor
    distribution: Any = None  # GaussianMixture | Checkerboard for synthetic data

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    @property
    def exact_denoiser(self):
        return None if self.distribution is None else self.distribution.denoise

    def source(self, seed: int = 0) -> BatchSource:
        """Training batches ``{"x": (B, *sample_shape)}``: fresh samples (synthetic) or epochs of ``train``."""
        if self.distribution is not None:
            return SyntheticSource(self.distribution, seed)
        return TensorSource({"x": self.train}, seed)


def heldout_split(n: int, seed: int, heldout_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train, heldout)`` of a deterministic split of ``n`` items: a permutation seeded by ``seed``
    whose first ``round(heldout_fraction * n)`` entries are held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_held = int(round(heldout_fraction * n))
    return perm[n_held:], perm[:n_held]


def load_data(cfg: DataConfig) -> Data:
    """Load (or sample) the data named by ``cfg``; the split is deterministic in ``cfg.seed``."""
    if cfg.name in ("gaussian_mixture", "checkerboard"):
        dist = (GaussianMixture(cfg.num_modes, cfg.mode_radius, cfg.mode_std) if cfg.name == "gaussian_mixture"
                else Checkerboard(cfg.checker_cells))
        g = torch.Generator().manual_seed(cfg.seed)
        return Data(cfg.name, dist.sample(SYNTHETIC_TRAIN_SIZE, g), dist.sample(SYNTHETIC_TRAIN_SIZE, g), dist)
    from cmt_core.data import images

    pixels = images.load_images(cfg)
    train, held = heldout_split(len(pixels), cfg.seed, cfg.heldout_fraction)
    return Data(cfg.name, pixels[train], pixels[held])
