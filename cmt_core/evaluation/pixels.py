"""Downsampled pixels as features: the honest fallback for image data when no Inception weights are local.

Nothing is learned or downloaded: images are area-averaged to at most 16 x 16 and flattened, and the Frechet
distance between those vectors is reported as ``FD-pixels``. It sees colour and layout statistics, not
semantics, so it is not comparable to FID and is never named so.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 16  # images are area-averaged to at most SIZE x SIZE


class PixelFeatures:
    """``(N, C, H, W)`` in [-1, 1] -> ``(N, C * min(H, SIZE) * min(W, SIZE))``; metric ``FD-pixels``. Images of
    different sizes are not comparable (``any_size``): their features differ in meaning, or in dimension."""

    name = "FD-pixels"
    cache_key = f"pixels-{SIZE}"
    any_size = False

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    @staticmethod
    def feature_dim(sample_shape: tuple[int, ...]) -> int:
        """``C * min(H, SIZE) * min(W, SIZE)`` of images ``sample_shape = (C, H, W)``."""
        c, h, w = sample_shape
        return c * min(h, SIZE) * min(w, SIZE)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = images.to(self.device, torch.float32)
        h, w = min(x.shape[-2], SIZE), min(x.shape[-1], SIZE)
        if (h, w) != tuple(x.shape[-2:]):
            x = F.adaptive_avg_pool2d(x, (h, w))
        return x.flatten(1).cpu().numpy()

    def info(self) -> dict:
        return {"extractor": self.name, "downsampled_to": SIZE}
