"""Residual MLP for vector data ``x: (B, D)``."""

import torch
from torch import nn

from cmt_core.conditioning import Cond, check_known
from cmt_core.networks.embedding import TimeEmbedding


class ResidualBlock(nn.Module):
    def __init__(self, width: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.emb = nn.Linear(emb_dim, width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        z = self.fc1(nn.functional.silu(self.norm(h))) + self.emb(emb)
        return h + self.fc2(self.dropout(nn.functional.silu(z)))


class MLP(nn.Module):
    """``net(x: (B, D), c_noise: (B, num_times), cond) -> (B, D)`` (unconditional: ``cond`` must be empty)."""

    def __init__(self, dim: int, width: int = 256, depth: int = 4, emb_dim: int = 128,
                 num_times: int = 1, dropout: float = 0.0):
        super().__init__()
        self.time = TimeEmbedding(emb_dim, num_times)
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(ResidualBlock(width, emb_dim, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        check_known(cond, (), "this MLP")
        emb = nn.functional.silu(self.time(c_noise))
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(nn.functional.silu(self.out_norm(h))).view_as(x)
