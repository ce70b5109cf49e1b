"""Residual MLP for vector data ``x: (B, D)``."""

import torch
from torch import nn

from cmt_core.conditioning import CLASS_LABELS, Cond, check_known
from cmt_core.networks.embedding import TimeEmbedding, label_input


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
    """``net(x: (B, D), c_noise: (B, num_times), cond) -> (B, D)``.

    Class labels (``label_dim > 0``), as the U-Net's (SongUNet's ``map_label``): ``cond["class_labels"]`` (float
    one-hot ``(B, label_dim)``; an all-zero row is the "unconditional" class; missing: all-zero rows) times
    ``sqrt(label_dim)`` through ``label`` (Linear ``label_dim -> emb_dim``, Xavier-uniform weight, zero bias),
    added to the time embedding before its SiLU. No label dropout here: the training loop drops labels for whole
    batches. An unconditional network (``label_dim = 0``: no ``label`` layer) refuses ``class_labels``."""

    def __init__(self, dim: int, width: int = 256, depth: int = 4, emb_dim: int = 128,
                 num_times: int = 1, dropout: float = 0.0, label_dim: int = 0):
        super().__init__()
        self.label_dim = label_dim
        self.time = TimeEmbedding(emb_dim, num_times)
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(ResidualBlock(width, emb_dim, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)
        self.label = nn.Linear(label_dim, emb_dim) if label_dim else None
        if self.label is not None:  # EDM's initialisation of SongUNet's map_label
            nn.init.xavier_uniform_(self.label.weight)
            nn.init.zeros_(self.label.bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        check_known(cond, (CLASS_LABELS,) if self.label_dim else (), "this MLP")
        emb = self.time(c_noise)
        if self.label is not None:
            emb = emb + self.label(label_input(cond, self.label_dim, x.shape[0], x.device))
        emb = nn.functional.silu(emb)
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(nn.functional.silu(self.out_norm(h))).view_as(x)
