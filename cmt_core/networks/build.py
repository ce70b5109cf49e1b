"""Builds a raw network from plain architecture values for a given sample shape."""

from __future__ import annotations

import math

from torch import nn

# the architecture values ``build_network`` takes (a model file's ``network`` mapping holds them, beside the
# preconditioning's ``sigma_data`` and ``consistency_boundary``; ``label_dim`` only where it is > 0)
ARCHITECTURE = ("kind", "width", "depth", "channel_mult", "attention_resolutions", "dropout", "emb_dim", "label_dim",
                "patch_size", "heads")
KINDS = ("mlp", "unet", "edm2", "dit")
DIT_ONLY = ("patch_size", "heads")  # architecture values only a DiT reads (absent from other models' files)


def build_network(kind: str, sample_shape: tuple[int, ...], num_times: int = 1, width: int = 256, depth: int = 4,
                  channel_mult: tuple[int, ...] = (1, 2, 2), attention_resolutions: tuple[int, ...] = (),
                  dropout: float = 0.0, emb_dim: int = 128, label_dim: int = 0, patch_size: int = 2,
                  heads: int = 16) -> nn.Module:
    """Raw network ``kind`` ('mlp' | 'unet' | 'edm2' | 'dit') for samples of ``sample_shape`` (``(D,)`` or
    ``(C, H, W)``; the U-Nets and the DiT need images) conditioned on ``num_times`` times. ``width``: the MLP's
    hidden width / the U-Nets' base channels / the DiT's hidden width; ``depth``: hidden layers / residual blocks
    per resolution / transformer blocks; ``patch_size``, ``heads``: the DiT's; ``channel_mult``,
    ``attention_resolutions``: the U-Nets'; ``emb_dim``: the time-embedding width (EDM2: a multiple of ``width``);
    ``label_dim``: the number of classes of ``cond["class_labels"]`` (0: unconditional)."""
    if kind not in KINDS:
        raise ValueError(f"unknown network kind {kind!r}; expected one of {list(KINDS)}")
    if kind == "mlp":
        from cmt_core.networks.mlp import MLP

        return MLP(math.prod(sample_shape), width, depth, emb_dim, num_times, dropout, label_dim)
    if len(sample_shape) != 3:
        raise ValueError(f"network.kind={kind!r} needs (C, H, W) samples, got shape {sample_shape}")
    if kind == "dit":
        from cmt_core.networks.dit import DiT

        channels, height, width_px = sample_shape
        return DiT((height, width_px), channels, patch_size, width, depth, heads, num_times=num_times,
                   label_dim=label_dim, dropout=dropout)
    if kind == "edm2":
        from cmt_core.networks.edm2 import edm2_network

        return edm2_network(sample_shape, num_times, width=width, depth=depth, channel_mult=channel_mult,
                            attention_resolutions=attention_resolutions, dropout=dropout, emb_dim=emb_dim,
                            label_dim=label_dim)
    from cmt_core.networks.unet import UNet

    channels, resolution, _ = sample_shape
    return UNet(img_resolution=resolution, in_channels=channels, model_channels=width, channel_mult=channel_mult,
                num_blocks=depth, attn_resolutions=attention_resolutions, dropout=dropout, emb_dim=emb_dim,
                num_times=num_times, label_dim=label_dim)
