"""DDPM++-style U-Net for images ``x: (B, C, H, W)`` (the architecture of EDM's SongUNet, DDPM++ config).

Layout, for ``L = len(channel_mult)`` resolutions ``R, R/2, ..., R/2^(L-1)``:

* encoder: a 3x3 input conv, then per resolution ``num_blocks`` residual blocks (self-attention at
  ``attn_resolutions``), and a downsampling residual block between resolutions;
* bottleneck: a residual block with self-attention and a plain one;
* decoder: per resolution ``num_blocks + 1`` residual blocks, each taking the concatenation of the
  running features and one encoder output (attention in the last block at ``attn_resolutions``),
  and an upsampling residual block between resolutions;
* output: GroupNorm, SiLU, 3x3 conv.

Residual branches end in a conv initialised at 1e-5 of its Xavier scale (as in EDM), so every block
starts close to its skip path while gradients still reach every weight. With
``model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,), emb_dim=512`` at
32x32 this is the DDPM++ CIFAR-10 network (about 56M parameters).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from cmt_core.networks.embedding import TimeEmbedding

SKIP_SCALE = math.sqrt(0.5)  # keeps the variance of (branch + skip) close to that of its inputs
SMALL_INIT = 1e-5


def _init(layer: nn.Conv2d | nn.Linear, scale: float = 1.0) -> nn.Conv2d | nn.Linear:
    """Xavier-uniform weight times ``scale``, zero bias (EDM's initialisation)."""
    nn.init.xavier_uniform_(layer.weight)
    with torch.no_grad():
        layer.weight.mul_(scale)
    nn.init.zeros_(layer.bias)
    return layer


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= min(32, channels // 4) that divides ``channels``."""
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


def _resample(x: torch.Tensor, mode: str | None) -> torch.Tensor:
    """``"down"``: 2x2 average pooling; ``"up"``: nearest 2x upsampling; ``None``: identity."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of ``x: (B, C, H, W)``; returns the residual update."""

    def __init__(self, channels: int, num_heads: int = 1):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = _init(nn.Conv2d(channels, 3 * channels, 1), math.sqrt(0.2))
        self.proj = _init(nn.Conv2d(channels, channels, 1), SMALL_INIT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # (B, 3C, H, W) -> three (B, heads, H*W, C/heads)
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class ResBlock(nn.Module):
    """Residual block ``(x: (B, in, H, W), emb: (B, emb_dim)) -> (B, out, H', W')``.

    ``resample`` ("down" / "up" / None) halves / doubles H, W. The embedding is added as a per-channel
    bias after the first conv; ``attention`` appends a self-attention layer.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float,
                 resample: str | None = None, attention: bool = False, takes_skip: bool = False):
        super().__init__()
        self.resample, self.takes_skip = resample, takes_skip
        self.norm0 = group_norm(in_channels)
        self.conv0 = _init(nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.emb = _init(nn.Linear(emb_dim, out_channels))
        self.norm1 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _init(nn.Conv2d(out_channels, out_channels, 3, padding=1), SMALL_INIT)
        needs_skip = in_channels != out_channels or resample is not None
        self.skip = _init(nn.Conv2d(in_channels, out_channels, 1)) if needs_skip else nn.Identity()
        self.attn = SelfAttention(out_channels) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(_resample(F.silu(self.norm0(x)), self.resample))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        x = (h + self.skip(_resample(x, self.resample))) * SKIP_SCALE
        if self.attn is not None:
            x = (x + self.attn(x)) * SKIP_SCALE
        return x


class UNet(nn.Module):
    """``net(x: (B, C, H, W), c_noise: (B, num_times)) -> (B, C, H, W)`` (unconditional).

    ``H = W = img_resolution`` must be divisible by ``2 ** (len(channel_mult) - 1)``.
    """

    def __init__(self, img_resolution: int, in_channels: int, model_channels: int, channel_mult: tuple[int, ...],
                 num_blocks: int, attn_resolutions: tuple[int, ...], dropout: float, emb_dim: int,
                 num_times: int = 1):
        super().__init__()
        if img_resolution % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^{len(channel_mult) - 1} "
                             f"(channel_mult={tuple(channel_mult)})")
        self.img_resolution, self.in_channels = img_resolution, in_channels
        self.time = TimeEmbedding(emb_dim, num_times)

        def block(cin: int, cout: int, **kwargs) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout, **kwargs)

        self.inp = _init(nn.Conv2d(in_channels, model_channels, 3, padding=1))
        self.enc = nn.ModuleList()
        skips, cout = [model_channels], model_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level > 0:
                self.enc.append(block(cout, cout, resample="down"))
                skips.append(cout)
            for _ in range(num_blocks):
                self.enc.append(block(cout, model_channels * mult, attention=res in attn_resolutions))
                cout = model_channels * mult
                skips.append(cout)

        self.mid = nn.ModuleList([block(cout, cout, attention=True), block(cout, cout)])
        self.dec = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level < len(channel_mult) - 1:
                self.dec.append(block(cout, cout, resample="up"))
            for idx in range(num_blocks + 1):
                attention = idx == num_blocks and res in attn_resolutions
                cin = cout + skips.pop()
                self.dec.append(block(cin, model_channels * mult, attention=attention, takes_skip=True))
                cout = model_channels * mult

        self.out_norm = group_norm(cout)
        self.out = _init(nn.Conv2d(cout, in_channels, 3, padding=1), SMALL_INIT)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        emb = F.silu(self.time(c_noise))  # conditioning (B, emb_dim) fed to every residual block
        h = self.inp(x)
        skips = [h]
        for blk in self.enc:
            h = blk(h, emb)
            skips.append(h)
        for blk in self.mid:
            h = blk(h, emb)
        for blk in self.dec:
            h = blk(torch.cat([h, skips.pop()], dim=1) if blk.takes_skip else h, emb)
        return self.out(F.silu(self.out_norm(h)))
