"""Downsampled pixels as features: the honest fallback for image data when no Inception weights are local.

Nothing is learned or downloaded: images are area-averaged to at most 16 x 16 and flattened, and the Frechet
distance between those vectors is reported as ``FD-pixels``. It sees colour and layout statistics, not
semantics, so it is not comparable to FID and is never named so.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class PixelFeatures:
    """``(N, C, H, W)`` in [-1, 1] -> ``(N, C * min(H, size) * min(W, size))``; metric ``FD-pixels``."""

    name = "FD-pixels"

    def __init__(self, size: int = 16, device: str | torch.device = "cpu"):
        self.size = size
        self.device = torch.device(device)
        self.cache_key = f"pixels-{size}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = images.to(self.device, torch.float32)
        h, w = min(x.shape[-2], self.size), min(x.shape[-1], self.size)
        if (h, w) != tuple(x.shape[-2:]):
            x = F.adaptive_avg_pool2d(x, (h, w))
        return x.flatten(1).cpu().numpy()

    def info(self) -> dict:
        return {"extractor": self.name, "downsampled_to": self.size}
