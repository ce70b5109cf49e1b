"""DDPM++ U-Net for images ``x: (B, C, H, W)``: EDM's SongUNet at its DDPM++ configuration, plus more times.

Layout for ``L = len(channel_mult)`` resolutions ``R, R/2, ..., R/2^(L-1)``. Parameter names are SongUNet's,
so an EDM network's weights load by name (``cmt_core.edm_pickle``):

* mapping: ``c_noise[:, 0]`` -> positional features (``model_channels`` wide) [+ ``map_label`` of the class
  labels] -> ``map_layer0``, SiLU, ``map_layer1`` -> SiLU -> ``emb`` (``emb_dim`` wide), the conditioning of every
  residual block. Each further time adds its own MLP (``map_later``, zero at init) before the last SiLU
  (``cmt_core.networks.embedding``);
* ``enc``: a 3x3 conv (``{R}x{R}_conv``); per resolution ``num_blocks`` residual blocks (``_block{i}``,
  self-attention at ``attn_resolutions``), after a downsampling block (``_down``) below the top resolution;
* ``dec``: at the lowest resolution a block with self-attention and a plain one (``_in0``, ``_in1``); per
  resolution an upsampling block (``_up``, not at the lowest) and ``num_blocks + 1`` blocks on the
  concatenation of the running features and one encoder output, the last with self-attention at
  ``attn_resolutions``; at full resolution GroupNorm, SiLU and a 3x3 conv (``_aux_norm``, ``_aux_conv``).

Class labels (``label_dim > 0``), as SongUNet's: ``cond["class_labels"]`` (float one-hot ``(B, label_dim)``, an
all-zero row being the "unconditional" class) times ``sqrt(label_dim)`` through ``map_label`` (Linear
``label_dim -> model_channels``), added to the first time's positional features. A missing entry is all-zero rows
(as EDM's ``EDMPrecond`` feeds without labels); an unconditional network refuses ``class_labels``. SongUNet's
``label_dropout`` is not done here: the training loop drops labels for whole batches, so a loaded EDM network's
setting of it is accepted and ignored.

What SongUNet offers and this network does not (a loaded EDM network that uses any of it is refused):
NCSN++'s Fourier embedding / residual encoder / skip decoder, other resampling filters than
[1, 1] (here: 2x2 average pooling and nearest upsampling, the same operations). The augmentation-label input
is left out: EDM feeds it only while training with augmentation, so it never changes a sample, and our
pipeline trains without augmentation (as the reference does).

Initialisation is EDM's: Xavier-uniform weights and zero biases; the last conv of each residual branch, the
attention output and the output conv at 1e-5 of that scale; the attention's qkv conv at sqrt(0.2).
With ``model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,), emb_dim=512`` at 32x32
this is the DDPM++ CIFAR-10 network: 55,732,739 parameters, as SongUNet's (55,733,891 in EDM's CIFAR-10
pickles, whose 9 augmentation labels add a 9 x 128 layer).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from cmt_core.conditioning import CLASS_LABELS, Cond, check_known
from cmt_core.networks.embedding import LaterTimeMLP, PositionalEmbedding, check_times, label_input

SKIP_SCALE = math.sqrt(0.5)  # keeps the variance of (branch + skip) close to that of its inputs
SMALL_INIT = 1e-5  # residual branches start close to zero while gradients still reach every weight
QKV_INIT = math.sqrt(0.2)


def _init(layer: nn.Conv2d | nn.Linear, scale: float = 1.0) -> nn.Conv2d | nn.Linear:
    """Xavier-uniform weight times ``scale``, zero bias (EDM's initialisation)."""
    nn.init.xavier_uniform_(layer.weight)
    with torch.no_grad():
        layer.weight.mul_(scale)
    nn.init.zeros_(layer.bias)
    return layer


class GroupNorm32(nn.GroupNorm):
    """``nn.GroupNorm`` computed in float32, its output in the input's dtype (fp32 runs are unchanged).

    Under bf16 autocast on CPU, PyTorch 2.14's group_norm gives a bf16 output whose forward-mode tangent is
    float32, and the next convolution's JVP (Mean Flow's) then fails on mixed dtypes; computed here outside
    autocast and cast back, output and tangent share the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= min(32, channels // 4) that divides ``channels`` (EDM's
    count wherever EDM's is defined, i.e. divides)."""
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return GroupNorm32(groups, channels, eps=1e-6)


def resample(x: torch.Tensor, mode: str | None) -> torch.Tensor:
    """``"down"``: 2x2 average pooling; ``"up"``: nearest 2x upsampling; anything else (None, EDM2's "keep"):
    identity. EDM's and EDM2's resampling with their default [1, 1] filter are these operations."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


class ResBlock(nn.Module):
    """Residual block ``(x: (B, in, H, W), emb: (B, emb_dim)) -> (B, out, H', W')`` (SongUNet's UNetBlock
    as DDPM++ configures it).

    ``resample`` ("down" / "up" / None) halves / doubles H, W before the first conv and on the skip path.
    The embedding is added as a per-channel bias after the first conv. ``attention`` appends single-head
    self-attention over the pixels. ``takes_skip``: the input is the concatenation with an encoder output.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float,
                 resample: str | None = None, attention: bool = False, takes_skip: bool = False):
        super().__init__()
        self.resample, self.attention, self.takes_skip = resample, attention, takes_skip
        self.norm0 = group_norm(in_channels)
        self.conv0 = _init(nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.affine = _init(nn.Linear(emb_dim, out_channels))
        self.norm1 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _init(nn.Conv2d(out_channels, out_channels, 3, padding=1), SMALL_INIT)
        needs_skip = in_channels != out_channels or resample is not None
        self.skip = _init(nn.Conv2d(in_channels, out_channels, 1)) if needs_skip else nn.Identity()
        if attention:
            self.norm2 = group_norm(out_channels)
            self.qkv = _init(nn.Conv2d(out_channels, 3 * out_channels, 1), QKV_INIT)
            self.proj = _init(nn.Conv2d(out_channels, out_channels, 1), SMALL_INIT)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(resample(F.silu(self.norm0(x)), self.resample))
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None]))
        h = self.conv1(self.dropout(h))
        x = (h + self.skip(resample(x, self.resample))) * SKIP_SCALE
        if self.attention:
            x = (x + self._attend(x)) * SKIP_SCALE
        return x

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        # SongUNet interleaves the qkv conv's output channels as (C, 3): channel 3i + j is entry i of q, k, v.
        q, k, v = self.qkv(self.norm2(x)).reshape(b, c, 3, height * width).permute(2, 0, 3, 1).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H*W, C)
        return self.proj(out.transpose(1, 2).reshape(b, c, height, width))


class UNet(nn.Module):
    """``net(x: (B, C, H, W), c_noise: (B, num_times), cond) -> (B, C, H, W)``; ``cond`` holds at most
    ``class_labels`` ``(B, label_dim)`` when ``label_dim > 0``, nothing otherwise.

    ``H = W = img_resolution`` must be divisible by ``2 ** (len(channel_mult) - 1)``.
    """

    def __init__(self, img_resolution: int, in_channels: int, model_channels: int, channel_mult: tuple[int, ...],
                 num_blocks: int, attn_resolutions: tuple[int, ...], dropout: float, emb_dim: int,
                 num_times: int = 1, label_dim: int = 0):
        super().__init__()
        levels = len(channel_mult)
        if img_resolution % 2 ** (levels - 1):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^{levels - 1} "
                             f"(channel_mult={tuple(channel_mult)})")
        self.img_resolution, self.in_channels, self.num_times = img_resolution, in_channels, num_times
        self.label_dim = label_dim
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_label = _init(nn.Linear(label_dim, model_channels)) if label_dim else None
        self.map_layer0 = _init(nn.Linear(model_channels, emb_dim))
        self.map_layer1 = _init(nn.Linear(emb_dim, emb_dim))
        self.map_later = nn.ModuleList(LaterTimeMLP(model_channels, emb_dim) for _ in range(num_times - 1))

        def block(cin: int, cout: int, **kwargs) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout, **kwargs)

        self.enc = nn.ModuleDict()
        cout = model_channels
        skips = [cout]  # the channels of every encoder output, each consumed by one decoder block
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = _init(nn.Conv2d(in_channels, cout, 3, padding=1))
            else:
                self.enc[f"{res}x{res}_down"] = block(cout, cout, resample="down")
                skips.append(cout)
            for idx in range(num_blocks):
                self.enc[f"{res}x{res}_block{idx}"] = block(cout, model_channels * mult,
                                                            attention=res in attn_resolutions)
                cout = model_channels * mult
                skips.append(cout)

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == levels - 1:
                self.dec[f"{res}x{res}_in0"] = block(cout, cout, attention=True)
                self.dec[f"{res}x{res}_in1"] = block(cout, cout)
            else:
                self.dec[f"{res}x{res}_up"] = block(cout, cout, resample="up")
            for idx in range(num_blocks + 1):
                self.dec[f"{res}x{res}_block{idx}"] = block(
                    cout + skips.pop(), model_channels * mult, takes_skip=True,
                    attention=idx == num_blocks and res in attn_resolutions)
                cout = model_channels * mult
        self.dec[f"{img_resolution}x{img_resolution}_aux_norm"] = group_norm(cout)
        self.dec[f"{img_resolution}x{img_resolution}_aux_conv"] = _init(
            nn.Conv2d(cout, in_channels, 3, padding=1), SMALL_INIT)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        check_times(c_noise, self.num_times)
        check_known(cond, (CLASS_LABELS,) if self.label_dim else (), "this U-Net")
        h = self.map_noise(c_noise[:, 0])
        if self.map_label is not None:
            h = h + self.map_label(label_input(cond, self.label_dim, x.shape[0], x.device))
        h = self.map_layer1(F.silu(self.map_layer0(h)))
        for k, mlp in enumerate(self.map_later, start=1):
            h = h + mlp(self.map_noise(c_noise[:, k]))
        emb = F.silu(h)  # (B, emb_dim)

        conv_in, *encoder = self.enc.values()
        h = conv_in(x)
        skips = [h]
        for blk in encoder:
            h = blk(h, emb)
            skips.append(h)
        *decoder, out_norm, out_conv = self.dec.values()
        for blk in decoder:
            h = blk(torch.cat([h, skips.pop()], dim=1) if blk.takes_skip else h, emb)
        return out_conv(F.silu(out_norm(h)))
