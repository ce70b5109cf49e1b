"""Time embeddings shared by the raw networks."""

import math

import torch
from torch import nn


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


class TimeEmbedding(nn.Module):
    """Embeds ``num_times`` noise conditionings ``(B, num_times) -> (B, dim)``.

    The first time goes through a Fourier embedding and an MLP; every further time adds the output of
    its own MLP whose last layer starts at zero. A two-time model therefore computes exactly the same
    function as the one-time model whose weights it was initialised from (teacher initialisation).
    """

    def __init__(self, dim: int, num_times: int = 1):
        super().__init__()
        self.num_times = num_times
        self.fourier = FourierEmbedding(dim)
        self.mlps = nn.ModuleList()
        for k in range(num_times):
            mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
            if k > 0:
                nn.init.zeros_(mlp[2].weight)
                nn.init.zeros_(mlp[2].bias)
            self.mlps.append(mlp)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        if c_noise.ndim != 2 or c_noise.shape[1] != self.num_times:
            raise ValueError(f"c_noise must be (B, {self.num_times}), got {tuple(c_noise.shape)}")
        return sum(mlp(self.fourier(c_noise[:, k])) for k, mlp in enumerate(self.mlps))
