"""Builds the raw network named by a ``NetworkConfig`` for a given sample shape."""

from __future__ import annotations

import math

from torch import nn

from cmt_core.config import NetworkConfig


def build_network(cfg: NetworkConfig, sample_shape: tuple[int, ...], num_times: int = 1) -> nn.Module:
    """Raw network for samples of ``sample_shape`` (``(D,)`` or ``(C, H, W)``) conditioned on ``num_times`` times."""
    if cfg.kind == "mlp":
        from cmt_core.networks.mlp import MLP

        return MLP(math.prod(sample_shape), cfg.width, cfg.depth, cfg.emb_dim, num_times, cfg.dropout)
    if len(sample_shape) != 3:
        raise ValueError(f"network.kind='unet' needs (C, H, W) samples, got shape {sample_shape}")
    from cmt_core.networks.unet import UNet

    channels, resolution, _ = sample_shape
    return UNet(
        img_resolution=resolution,
        in_channels=channels,
        model_channels=cfg.width,
        channel_mult=cfg.channel_mult,
        num_blocks=cfg.depth,
        attn_resolutions=cfg.attention_resolutions,
        dropout=cfg.dropout,
        emb_dim=cfg.emb_dim,
        num_times=num_times,
    )
