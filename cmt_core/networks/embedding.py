"""Time embeddings shared by the raw networks.

A raw network conditions on ``num_times`` noise conditionings ``c_noise: (B, num_times)``. The first time goes
through an MLP of its sinusoidal features; every further time (a flow map's second time) adds the output of
its own ``LaterTimeMLP``, whose last layer starts at zero. A model with two times initialised from a one-time
model's weights therefore computes exactly that model's function (teacher initialisation,
``cmt_core.models.init_from``).

A class-conditional network (``label_dim > 0``) reads ``cond["class_labels"]`` through ``label_input``.
"""

import math

import torch
from torch import nn

from cmt_core.conditioning import CLASS_LABELS, Cond


def check_times(c_noise: torch.Tensor, num_times: int) -> None:
    """Raise unless ``c_noise`` is ``(B, num_times)``."""
    if c_noise.ndim != 2 or c_noise.shape[1] != num_times:
        raise ValueError(f"c_noise must be (B, {num_times}), got {tuple(c_noise.shape)}")


def label_input(cond: Cond | None, label_dim: int, batch: int, device) -> torch.Tensor:
    """The input of a class-conditional network's label layer: ``cond["class_labels"]`` (float one-hot rows
    ``(batch, label_dim)``; an all-zero row is the "unconditional" class) in float32, times ``sqrt(label_dim)``
    (EDM's and EDM2's scaling: one-hot rows of unit root-mean-square). A missing entry is all-zero rows, as EDM's
    and EDM2's preconditioning feed without labels; another shape raises ``ValueError``."""
    labels = (cond or {}).get(CLASS_LABELS)
    if labels is None:
        return torch.zeros(batch, label_dim, device=device)
    if tuple(labels.shape) != (batch, label_dim):
        raise ValueError(f"class_labels must be (B, {label_dim}) = ({batch}, {label_dim}), got {tuple(labels.shape)}")
    return labels.to(device, torch.float32) * math.sqrt(label_dim)


class FourierEmbedding(nn.Module):
    """Sinusoidal features of a scalar: ``(B,) -> (B, dim)`` (fixed frequencies, log-spaced)."""

    def __init__(self, dim: int, max_period: float = 10_000.0):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        # c_noise = ln(sigma)/4 lies in about [-1.6, 1.1]; scale it so that the fastest frequency varies.
        arg = (c.float() * 250.0)[:, None] * self.freqs[None, :]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class PositionalEmbedding(nn.Module):
    """DDPM++'s sinusoidal features of a scalar, ``(B,) -> (B, dim)``: ``[sin(c w), cos(c w)]`` for
    ``dim / 2`` frequencies ``w`` spaced geometrically from 1 down to ``1 / max_period``, both ends included.

    ``c`` is used unscaled, as EDM's SongUNet does: EDM preconditioning feeds ``ln(sigma) / 4``, EDM's VP
    preconditioning the DDPM step index ``(M - 1) u`` in [0, 999].
    """

    def __init__(self, dim: int, max_period: float = 10_000.0):
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"positional embedding needs an even width >= 4, got {dim}")
        self.dim, self.max_period = dim, max_period

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        # Computed per call, in float32 on c's device, the way SongUNet does, so that a loaded EDM network
        # sees bit-identical features on every device.
        exponents = torch.arange(half, dtype=torch.float32, device=c.device) / (half - 1)
        arg = c.float()[:, None] * ((1 / self.max_period) ** exponents)[None, :]
        return torch.cat([arg.sin(), arg.cos()], dim=1)


class LaterTimeMLP(nn.Sequential):
    """The embedding MLP of a second, third, ... time: ``(B, in_dim) -> (B, dim)``, last layer zero at init."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.zeros_(self[2].weight)
        nn.init.zeros_(self[2].bias)


class TimeEmbedding(nn.Module):
    """Embeds ``num_times`` noise conditionings ``(B, num_times) -> (B, dim)`` (the MLP network's embedding):
    ``features`` Fourier features (None: ``dim``), one MLP per time, summed."""

    def __init__(self, dim: int, num_times: int = 1, features: int | None = None):
        super().__init__()
        self.num_times = num_times
        features = features or dim
        self.fourier = FourierEmbedding(features)
        first = nn.Sequential(nn.Linear(features, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.mlps = nn.ModuleList([first, *(LaterTimeMLP(features, dim) for _ in range(num_times - 1))])

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        check_times(c_noise, self.num_times)
        return sum(mlp(self.fourier(c_noise[:, k])) for k, mlp in enumerate(self.mlps))
