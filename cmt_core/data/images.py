"""Image datasets as float tensors ``(N, C, H, W)`` in [-1, 1].

``digits`` ships with scikit-learn (1,797 grey 8x8 images, values 0..16).
"""

from __future__ import annotations

import numpy as np
import torch

from cmt_core.config import DataConfig


def to_model_range(pixels: np.ndarray, max_value: float) -> torch.Tensor:
    """uint8-like pixels in [0, max_value] -> float32 in [-1, 1]."""
    return torch.from_numpy(np.asarray(pixels, dtype=np.float32) / max_value * 2 - 1)


def load_digits() -> torch.Tensor:
    from sklearn.datasets import load_digits as sklearn_digits

    return to_model_range(sklearn_digits().images[:, None], 16.0)


def load_images(cfg: DataConfig) -> torch.Tensor:
    """All images of the dataset named by ``cfg`` (the caller splits train / held-out)."""
    if cfg.name == "digits":
        return load_digits()
    raise ValueError(f"unknown image dataset {cfg.name!r}")
