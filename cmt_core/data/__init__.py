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


def load_data(cfg: DataConfig) -> Data:
    """Load (or sample) the data named by ``cfg``; the split is deterministic in ``cfg.seed``."""
    if cfg.name in ("gaussian_mixture", "checkerboard"):
        dist = (GaussianMixture(cfg.num_modes, cfg.mode_radius, cfg.mode_std) if cfg.name == "gaussian_mixture"
                else Checkerboard(cfg.checker_cells))
        g = torch.Generator().manual_seed(cfg.seed)
        return Data(cfg.name, dist.sample(SYNTHETIC_TRAIN_SIZE, g), dist.sample(SYNTHETIC_TRAIN_SIZE, g), dist)
    from cmt_core.data import images

    pixels = images.load_images(cfg)
    perm = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(cfg.seed))
    n_held = int(round(cfg.heldout_fraction * len(pixels)))
    return Data(cfg.name, pixels[perm[n_held:]], pixels[perm[:n_held]])
