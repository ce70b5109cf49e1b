"""EDM2's magnitude-preserving U-Net ("Analyzing and Improving the Training Dynamics of Diffusion Models", Karras
et al. 2024; NVlabs/edm2 ``training/networks_edm2.py``, class ``UNet``) as a raw network of this repository:
``net(x: (B, C, H, W), c_noise: (B, num_times), cond=None) -> like x``.

Parameter and buffer names are those of NVlabs/edm2's ``UNet`` state dict (EDM2's ``Precond`` holds it as
``unet``), so an EDM2 network's weights load by name (``cmt_core.edm2_pickle``). The pieces:

* ``normalize`` (unit magnitude per output unit), ``mp_silu``, ``mp_sum``, ``mp_cat``: the magnitude-preserving
  operations; ``MPFourier``: random Fourier features of ``c_noise`` (fixed buffers ``freqs``, ``phases``);
* ``MPConv``: convolution / linear layer whose weight is normalised on every use and scaled by
  ``gain / sqrt(fan_in)``; in training mode it also applies *forced weight normalisation*: before use it writes
  the normalised weight back into the parameter (see ``MPConv``, ``forced_weight_norm``);
* ``Block``: EDM2's residual block (encoder flavour: 1x1 skip conv before, pixel norm; decoder flavour: skip conv
  after), embedding as a multiplicative ``1 + gain * linear(emb)``, residual balance 0.3, multi-head
  self-attention (``channels_per_head`` = 64 channels a head, attention balance 0.3), activations clipped to
  +-256;
* ``EDM2UNet``: the input gets a constant-one channel; encoder ``{R}x{R}_conv`` then per resolution a ``_down``
  block (below the top) and ``num_blocks`` blocks; decoder ``_in0`` (with attention) and ``_in1`` at the lowest
  resolution, ``_up`` blocks above it, ``num_blocks + 1`` blocks per resolution on ``mp_cat`` of the running
  features and an encoder output; ``out_conv`` with a learned gain that starts at zero (the network's output
  starts at exactly zero).

Conditioning: ``cond["class_labels"]`` (float one-hot ``(B, label_dim)``) for a class-conditional network
(``label_dim > 0``), embedded as EDM2 does (``emb_label`` of ``sqrt(label_dim) * labels``, combined with the noise
embedding by ``mp_sum``). A missing entry is an all-zero row, as EDM2's ``Precond`` feeds when it gets no labels.
Note that an EDM2 network is trained without label dropout: the all-zero row is an input it never saw, not a
trained unconditional branch (EDM2 guides with separate unconditional or smaller networks). An unconditional
network refuses ``class_labels``.

More times (a flow map's second time): each further time adds ``MPLaterTime(F(c_noise[:, k]))`` to the noise
embedding before the label and the SiLU, where ``F`` is the first time's ``MPFourier``. Its gain starts at exactly
zero, so a two-time network loaded with a one-time network's weights computes exactly that network's function
(``cmt_core.models.init_from`` allows its parameters, ``emb_later.*``, to be missing: it is a ``LaterTimeMLP``).

Forced weight normalisation: each ``MPConv`` has the attribute ``force_wn`` (True by default); in training mode
with ``force_wn`` set, its forward pass overwrites its weight with the normalised weight. ``forced_weight_norm(
model, False)`` switches it off for a block of code (and restores the previous settings after);
``apply_forced_weight_norm(model)`` applies it once, outside a forward pass (for ``torch.func`` transforms, which
refuse the in-place write a training-mode forward makes). The CMT reference (sony/cmt, ``imagenet512/training``)
adds the same flag to its copy of ``MPConv`` (``force_wn``) and, in its ECT / ECD losses, wraps the target pass (a
``no_grad`` call of the same network, still in training mode, after the student pass) in a context manager
``disable_forced_wn`` that sets the flag False on every ``MPConv`` and back to True after. The student pass has
already normalised the weights; normalising them again would make the target pass use slightly different weights
than the student pass, whereas with the switch off it uses exactly the same ones.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from cmt_core.conditioning import CLASS_LABELS, Cond, check_known
from cmt_core.networks.embedding import LaterTimeMLP, check_times, label_input
from cmt_core.networks.unet import resample

MP_SILU_SCALE = 0.596  # the root-mean-square of silu(x) for x ~ N(0, 1)


def normalize(x: torch.Tensor, dim: Sequence[int] | int | None = None, eps: float = 1e-4) -> torch.Tensor:
    """``x`` divided by its root-mean-square magnitude over ``dim`` (default: every dimension but the first) plus
    ``eps``; the norm is computed in float32."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))  # eps + alpha * norm, fused
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU scaled back to unit magnitude for unit-variance inputs."""
    return F.silu(x) / MP_SILU_SCALE


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """``(1 - t) a + t b``, rescaled so that the sum of independent unit-magnitude inputs has unit magnitude."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation along ``dim`` with ``a`` weighted by ``1 - t`` and ``b`` by ``t``, each part scaled by its
    width so that the result keeps unit magnitude."""
    size_a, size_b = a.shape[dim], b.shape[dim]
    scale = math.sqrt((size_a + size_b) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (scale / math.sqrt(size_a) * (1 - t)), b * (scale / math.sqrt(size_b) * t)], dim=dim)


class MPFourier(nn.Module):
    """Fourier features ``(B,) -> (B, num_channels)``: ``sqrt(2) cos(2 pi (f c + p))`` with random frequencies
    ``f ~ N(0, bandwidth^2)`` and phases ``p ~ U[0, 1)`` (stored as ``freqs = 2 pi f``, ``phases = 2 pi p``)."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        arg = torch.outer(c.float(), self.freqs.float()) + self.phases.float()
        return (arg.cos() * math.sqrt(2)).to(c.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (``kernel`` = (k, k), 'same' padding) or linear layer (``kernel`` = ()).

    The weight used is ``normalize(weight) * gain / sqrt(fan_in)``. ``force_wn``: in training mode, first write
    ``normalize(weight)`` back into the parameter (forced weight normalisation, EDM2's Equation 66), so that the
    stored weights stay at unit magnitude while the optimiser updates them. As in EDM2, a float32 weight is then
    normalised once more for use (the read and the write share the tensor). Eval mode never writes.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.out_channels = out_channels
        self.force_wn = True
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain: torch.Tensor | float = 1.0) -> torch.Tensor:
        w = self.weight.to(torch.float32)  # the parameter itself when it is float32
        if self.training and self.force_wn:
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


@contextlib.contextmanager
def forced_weight_norm(model: nn.Module, enabled: bool) -> Iterator[nn.Module]:
    """Within the block, forced weight normalisation is ``enabled`` or not in every ``MPConv`` of ``model`` (a
    wrapper such as a preconditioning module or DDP works too); each layer's previous setting is restored after.

    Consistency training uses ``with forced_weight_norm(net, False):`` around its target pass (see the module
    docstring). Set ``MPConv.force_wn`` directly for a lasting change."""
    layers = [m for m in model.modules() if isinstance(m, MPConv)]
    previous = [layer.force_wn for layer in layers]
    for layer in layers:
        layer.force_wn = enabled
    try:
        yield model
    finally:
        for layer, setting in zip(layers, previous):
            layer.force_wn = setting


@torch.no_grad()
def apply_forced_weight_norm(model: nn.Module) -> None:
    """Forced weight normalisation now, in every ``MPConv`` of ``model``: writes ``normalize(weight)`` into the
    weight, as a training-mode forward pass does before it uses the weight.

    A training-mode pass under ``forced_weight_norm(model, False)`` after this call computes exactly what a
    training-mode pass with forced normalisation computes. That is the way through ``torch.func`` transforms
    (Mean Flow's ``torch.func.jvp``), which refuse the in-place write inside the transformed function:
    ``apply_forced_weight_norm(net)``, then ``with forced_weight_norm(net, False): torch.func.jvp(...)``."""
    for layer in model.modules():
        if isinstance(layer, MPConv):
            layer.weight.copy_(normalize(layer.weight.to(torch.float32)))


class Block(nn.Module):
    """EDM2's U-Net block ``(x: (B, in, H, W), emb: (B, emb_channels)) -> (B, out, H', W')``.

    ``flavor`` 'enc': resample, 1x1 conv to ``out`` channels when they differ, pixel norm, then the residual branch
    on the result; 'dec': the residual branch on the resampled input, the 1x1 conv on the skip path.
    ``resample_mode``: 'keep' / 'down' / 'up'. ``attention``: ``out // channels_per_head`` heads (none when that
    is 0, as in EDM2: a block narrower than one head has no attention)."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", attention: bool = False, channels_per_head: int = 64,
                 dropout: float = 0.0, res_balance: float = 0.3, attn_balance: float = 0.3,
                 clip_act: float | None = 256):
        super().__init__()
        if flavor not in ("enc", "dec") or resample_mode not in ("keep", "down", "up"):
            raise ValueError(f"unknown block flavor {flavor!r} or resample_mode {resample_mode!r}")
        self.out_channels, self.flavor, self.resample_mode = out_channels, flavor, resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, (3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels, ())
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, (1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, (1, 1)) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)
        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            x = mp_sum(x, self._attend(x), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        # EDM2's channel layout of the qkv conv's output: (head, channel within the head, q / k / v).
        qkv = self.attn_qkv(x).reshape(batch, self.num_heads, -1, 3, height * width)
        q, k, v = normalize(qkv, dim=2).unbind(3)  # each (B, heads, head channels, pixels), unit magnitude
        weights = torch.einsum("bhcq,bhck->bhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
        out = torch.einsum("bhqk,bhck->bhcq", weights, v)
        return self.attn_proj(out.reshape(batch, channels, height, width))


class MPLaterTime(LaterTimeMLP):
    """The noise embedding of a second, third, ... time: ``(B, in_dim) -> (B, dim)``, ``gain * MPConv(features)``
    with a learned gain that starts at exactly zero (a ``LaterTimeMLP``, so ``init_from`` may leave it unloaded).
    Its parameters: ``linear.weight``, ``gain``."""

    def __init__(self, in_dim: int, dim: int):
        nn.Sequential.__init__(self)  # not LaterTimeMLP's layers: an MPConv and a gain instead
        self.linear = MPConv(in_dim, dim, ())
        self.gain = nn.Parameter(torch.zeros([]))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features, gain=self.gain)


class EDM2UNet(nn.Module):
    """EDM2's U-Net: ``net(x: (B, img_channels, R, R), c_noise: (B, num_times), cond) -> like x``.

    Constructor arguments as NVlabs/edm2's ``UNet`` (its ``Block`` arguments ``channels_per_head``, ``dropout``,
    ``res_balance``, ``attn_balance``, ``clip_act`` spelt out; the resampling filter is EDM2's default [1, 1]),
    plus ``num_times``. Channels per resolution: ``model_channels * channel_mult``; noise-feature width
    ``model_channels * channel_mult_noise`` (None: the first resolution's channels); embedding width
    ``model_channels * channel_mult_emb`` (None: the widest resolution's channels). EDM2's default values are its
    ImageNet configurations' (``edm2-img64-s`` / ``edm2-img512-s``: ``model_channels`` 192)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_noise: int | None = None,
                 channel_mult_emb: int | None = None, num_blocks: int = 3, attn_resolutions: Sequence[int] = (16, 8),
                 label_balance: float = 0.5, concat_balance: float = 0.5, channels_per_head: int = 64,
                 dropout: float = 0.0, res_balance: float = 0.3, attn_balance: float = 0.3,
                 clip_act: float | None = 256, num_times: int = 1):
        super().__init__()
        levels = len(channel_mult)
        if levels < 1 or img_resolution % 2 ** (levels - 1):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^{levels - 1} "
                             f"(channel_mult={tuple(channel_mult)})")
        if num_times < 1:
            raise ValueError(f"num_times must be >= 1, got {num_times}")
        widths = [model_channels * mult for mult in channel_mult]
        noise_channels = model_channels * channel_mult_noise if channel_mult_noise is not None else widths[0]
        emb_channels = model_channels * channel_mult_emb if channel_mult_emb is not None else max(widths)
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.num_times, self.label_balance, self.concat_balance = num_times, label_balance, concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))

        self.emb_fourier = MPFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb_channels, ())
        self.emb_label = MPConv(label_dim, emb_channels, ()) if label_dim else None
        self.emb_later = nn.ModuleList(MPLaterTime(noise_channels, emb_channels) for _ in range(num_times - 1))

        def block(cin: int, cout: int, **kwargs) -> Block:
            return Block(cin, cout, emb_channels, channels_per_head=channels_per_head, dropout=dropout,
                         res_balance=res_balance, attn_balance=attn_balance, clip_act=clip_act, **kwargs)

        self.enc = nn.ModuleDict()
        cout = img_channels + 1  # the input and a constant-one channel
        for level, width in enumerate(widths):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(cout, width, (3, 3))
                cout = width
            else:
                self.enc[f"{res}x{res}_down"] = block(cout, cout, flavor="enc", resample_mode="down")
            for idx in range(num_blocks):
                self.enc[f"{res}x{res}_block{idx}"] = block(cout, width, flavor="enc",
                                                            attention=res in attn_resolutions)
                cout = width

        self.dec = nn.ModuleDict()
        skips = [module.out_channels for module in self.enc.values()]
        for level, width in reversed(list(enumerate(widths))):
            res = img_resolution >> level
            if level == levels - 1:
                self.dec[f"{res}x{res}_in0"] = block(cout, cout, flavor="dec", attention=True)
                self.dec[f"{res}x{res}_in1"] = block(cout, cout, flavor="dec")
            else:
                self.dec[f"{res}x{res}_up"] = block(cout, cout, flavor="dec", resample_mode="up")
            for idx in range(num_blocks + 1):
                self.dec[f"{res}x{res}_block{idx}"] = block(cout + skips.pop(), width, flavor="dec",
                                                            attention=res in attn_resolutions)
                cout = width
        self.out_conv = MPConv(cout, img_channels, (3, 3))

    def embedding(self, c_noise: torch.Tensor, cond: Cond | None) -> torch.Tensor:
        """The embedding ``(B, emb_channels)`` of the times and the class label that conditions every block."""
        emb = self.emb_noise(self.emb_fourier(c_noise[:, 0]))
        for k, later in enumerate(self.emb_later, start=1):
            emb = emb + later(self.emb_fourier(c_noise[:, k]))
        if self.emb_label is not None:
            labels = label_input(cond, self.label_dim, c_noise.shape[0], c_noise.device)
            emb = mp_sum(emb, self.emb_label(labels), t=self.label_balance)
        return mp_silu(emb)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        check_times(c_noise, self.num_times)
        check_known(cond, (CLASS_LABELS,) if self.label_dim else (), "this EDM2 U-Net")
        emb = self.embedding(c_noise, cond)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for module in self.enc.values():
            x = module(x) if isinstance(module, MPConv) else module(x, emb)
            skips.append(x)
        for name, module in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = module(x, emb)
        return self.out_conv(x, gain=self.out_gain)


def edm2_network(sample_shape: Sequence[int], num_times: int = 1, width: int = 192, depth: int = 3,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), attention_resolutions: Sequence[int] = (16, 8),
                 dropout: float = 0.0, emb_dim: int | None = None, label_dim: int = 0, *,
                 channels_per_head: int = 64) -> EDM2UNet:
    """EDM2's U-Net for samples of ``sample_shape`` = ``(C, R, R)`` from this repository's architecture values:

    * ``width``: ``model_channels`` (channels at the top resolution: ``width * channel_mult[0]``);
    * ``depth``: ``num_blocks`` (blocks per resolution in the encoder; the decoder has one more);
    * ``channel_mult``, ``attention_resolutions`` (``attn_resolutions``), ``dropout``: as EDM2's;
    * ``emb_dim``: the embedding width, a multiple of ``width`` (``channel_mult_emb = emb_dim / width``); 0 or
      None: EDM2's default, the widest resolution's channels (``width * max(channel_mult)``);
    * ``label_dim``: the number of classes (0: unconditional); ``num_times``: 1 (denoiser, consistency model) or
      2 (flow map);
    * ``channels_per_head``: EDM2's 64; attention needs blocks at least that wide (narrower: none, as in EDM2).

    EDM2's ``edm2-img64-s``: ``edm2_network((3, 64, 64), width=192, depth=3, channel_mult=(1, 2, 3, 4),
    attention_resolutions=(16, 8), dropout=0.0, label_dim=1000)`` (embedding width 768); its ``img512``
    networks are the same on ``(4, 64, 64)`` latents with widths 64 (xxs) to 448 (xxl)."""
    if len(sample_shape) != 3 or sample_shape[1] != sample_shape[2]:
        raise ValueError(f"an EDM2 U-Net needs square (C, R, R) samples, got shape {tuple(sample_shape)}")
    channel_mult_emb = None
    if emb_dim:
        if emb_dim % width:
            raise ValueError(f"an EDM2 U-Net's emb_dim must be a multiple of its width {width} (or 0 for EDM2's "
                             f"default {width * max(channel_mult)}), got {emb_dim}")
        channel_mult_emb = emb_dim // width
    channels, resolution, _ = sample_shape
    return EDM2UNet(img_resolution=resolution, img_channels=channels, label_dim=label_dim, model_channels=width,
                    channel_mult=tuple(channel_mult), channel_mult_emb=channel_mult_emb, num_blocks=depth,
                    attn_resolutions=tuple(attention_resolutions), channels_per_head=channels_per_head,
                    dropout=dropout, num_times=num_times)
