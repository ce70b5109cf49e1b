"""ELatentLPIPS: a perceptual distance computed on latents by a VGG16 trained as a classifier on latents.

The paper's ImageNet-512 recipe mid-trains with it (sony/cmt, folder ``imagenet512/`` at commit 5a99e54, not on the
main branch):

* ``imagenet512/elatentlpips/models.py``: the network ``VGG16_Latent_GN`` (line 83; layer list line 9, built at
  line 52, head line 30): VGG16's thirteen 3x3 convolutions, each followed by GroupNorm(32) and ReLU, 4 input
  channels, max-pooling only after the 7th and 10th convolutions, then torchvision's classifier (adaptive average
  pool to 7x7, 25088 -> 4096 -> 4096 -> 1000, dropout 0.5). The distance the losses build, ``ELatentLPIPS2``: five
  taps, ``features[0:6]``, ``[6:12]``, ``[12:21]``, ``[21:31]``, ``[31:41]``; each normalised over channels
  (``normalize_tensor``, line 98: eps 1e-8 inside the square root), the squared difference summed over channels,
  averaged over space (line 102), summed over the taps; no learned linear heads.
* ``imagenet512/training/loss.py``: ``DPMSolverLoss`` (mid-training) and ``ECDGuidLoss`` build
  ``ELatentLPIPS2(pretrained_latent_lpips_path="vgg.pt", aug_type="bgcfnc")`` (strength 1): both inputs go through
  one ADA pipeline (``ada_augpipe['bgcfnc']``, models.py line 22) with every StyleGAN2-ADA transform at its default
  magnitude (x-flip, 90-degree rotations, integer translation, isotropic / anisotropic scaling, rotation,
  fractional translation; brightness, contrast, luma flip, hue, saturation; image-space filter; additive noise;
  cutout), one draw per sample applied to both inputs.
* The pipeline (``elatentlpips/augmentations/ada_aug.py``, imported by models.py line 5) is not in our copy of that
  commit. The folder comes from SNU-VGILab/e-latentlpips (commit 0ade36d), whose ``models.py`` is sony's without
  ``ELatentLPIPS2``; its ``ada_aug.py`` (``AdaAugment.forward``, line 179) is what ``augment_pair`` reimplements.
  On 4 channels its colour transform multiplies the channels by the 4x4 homogeneous colour matrix (line 369: the
  4th channel plays the homogeneous coordinate, e.g. brightness adds b times channel 4 to channels 1-3); we do the
  same. One noise field is added to both inputs (lines 427-429). Its random draws come from the global torch
  generator of the inputs' device in a fixed order; ``augment_pair`` makes the same draws in the same order (the
  same global seed gives the same transforms, checked bit for bit on CPU), or takes them from a ``torch.Generator``.
* ``imagenet512/train_latent_vgg.py``: the network is trained as an ImageNet classifier on EDM2's latents
  (``encoder.encode_latents``, line 127, of ``edm2-img512-s-2147483-0.130``'s encoder, line 93): SGD (line 82), lr
  0.1, momentum 0.9, weight decay 1e-4 (lines 30-32), batch 256 (line 28), 100 epochs (line 35), lr x0.1 every 30
  epochs (``StepLR``, line 83, stepped every ``len(dataset) // 256`` iterations, lines 114 and 160-161),
  cross-entropy (line 132), no augmentation, fp32. ``train_latent_vgg`` runs that recipe.

What we do differently, on purpose:

* Weights are a state dict read without running code (``torch.load(weights_only=True)`` or safetensors); the
  reference pickles the whole module (train_latent_vgg.py line 158) and unpickles it with ``weights_only=False``.
  Its ``vgg.pt`` converts once, where it is trusted, by
  ``torch.save(torch.load(p, weights_only=False)["model"].state_dict(), out)``: the names are the same.
* Both inputs go through the network as one batch (GroupNorm is per sample: the same features; bit for bit on CPU);
  the distance is ``(B,)`` rather than ``(B, 1, 1, 1)``.
* The reference draws training batches from an endless shuffled stream (line 89) and counts an epoch as
  ``len // 256`` batches; ``train_latent_vgg`` makes plain epochs (one reshuffled pass, the last short batch kept)
  over a dataset of latents as they are (the reference samples each latent afresh from EDM2's encoder posterior).
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cmt_core.artifacts import publish
from cmt_core.checkpoint import atomic_save
from cmt_core.rng import Stream, seed_of

LATENT_VGG16 = (64, 64, 128, 128, 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)  # "M": 2x2 max-pool
TAP_ENDS = (6, 12, 21, 31, 41)  # feature taps: the outputs of features[:6], [6:12], [12:21], [21:31], [31:41]
GROUPS = 32  # GroupNorm groups of every convolution

# orthogonal wavelet low-pass filters (PyWavelets' sym2, sym6), as StyleGAN2-ADA's pipeline uses them
SYM2 = (-0.12940952255092145, 0.22414386804185735, 0.836516303737469, 0.48296291314469025)
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633, 0.4910559419267466,
        0.787641141030194, 0.3379294217276218, -0.07263752278646252, -0.021060292512300564, 0.04472490177066578,
        0.0017677118642428036, -0.007800708325034148)


# ------------------------------------------------------------------------------------------------------ network
def latent_vgg16_features(in_channels: int = 4) -> nn.Sequential:
    """The convolutional trunk, 41 modules named as the reference's ``features.<i>``: ``(B, C, H, W) ->
    (B, 512, H / 4, W / 4)`` (floors)."""
    layers: list[nn.Module] = []
    for width in LATENT_VGG16:
        if width == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.GroupNorm(GROUPS, width), nn.ReLU()]
        in_channels = width
    return nn.Sequential(*layers)


def feature_taps(features: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """The five taps of the trunk for ``x: (B, C, H, W)``: ``(B, 64, H, W)``, ``(B, 128, H, W)``,
    ``(B, 256, H, W)``, ``(B, 512, H/2, W/2)``, ``(B, 512, H/4, W/4)``."""
    taps, start = [], 0
    for end in TAP_ENDS:
        x = features[start:end](x)
        taps.append(x)
        start = end
    return taps


class LatentVGG16(nn.Module):
    """VGG16 with GroupNorm for latents, as a classifier: ``(B, C, H, W) -> logits (B, num_classes)``.

    State-dict names are the reference's ``VGG16_Latent_GN`` (``features.*``, ``classifier.*``); the distance uses
    ``features`` only. ``H, W >= 4`` (two 2x2 max-pools). ``hidden``: the width of the classifier's two hidden
    layers (4096 in the reference: 124M of the network's 138M parameters)."""

    def __init__(self, in_channels: int = 4, num_classes: int = 1000, hidden: int = 4096):
        super().__init__()
        self.features = latent_vgg16_features(in_channels)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, hidden), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


# ------------------------------------------------------------------------------------------------- augmentation
def _matrix(rows, batch: int, device) -> torch.Tensor:
    """``(B, n, n)`` float32 from n rows of n entries, each a number or a ``(B,)`` tensor (numbers are rounded to
    float32 one by one, then stacked)."""
    return torch.stack([torch.stack([torch.as_tensor(e, dtype=torch.float32, device=device).expand(batch)
                                     for e in row], -1) for row in rows], -2)


def _scale2(sx, sy, batch: int, device) -> torch.Tensor:
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], batch, device)


def _translate2(tx, ty, batch: int, device) -> torch.Tensor:
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], batch, device)


def _rotate2(theta: torch.Tensor) -> torch.Tensor:
    """Counter-clockwise rotation by ``theta: (B,)`` in homogeneous 2-D coordinates: ``(B, 3, 3)``."""
    return _matrix([[theta.cos(), (-theta).sin(), 0], [theta.sin(), theta.cos(), 0], [0, 0, 1]],
                   theta.shape[0], theta.device)


def _colour_rotation(axis: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotation by ``theta: (B,)`` about the unit ``axis`` (its first three entries) in homogeneous 3-D colour
    coordinates (Rodrigues): ``(B, 4, 4)``."""
    x, y, z = axis[0], axis[1], axis[2]
    s, c = theta.sin(), theta.cos()
    cc = 1 - c
    return _matrix([[x * x * cc + c, x * y * cc - z * s, x * z * cc + y * s, 0],
                    [y * x * cc + z * s, y * y * cc + c, y * z * cc - x * s, 0],
                    [z * x * cc - y * s, z * y * cc + x * s, z * z * cc + c, 0],
                    [0, 0, 0, 1]], theta.shape[0], theta.device)


def _filter_bank() -> torch.Tensor:
    """StyleGAN2-ADA's 4-band filter bank built from sym2 by repeated 2x upsampling: ``(4, 43)`` float32; row 0 is
    the lowest band (a unit impulse convolved three times with the half-band low-pass)."""
    lo = np.asarray(SYM2)
    hi = lo * (-1.0) ** np.arange(lo.size)  # H(-z)
    lo2, hi2 = np.convolve(lo, lo[::-1]) / 2, np.convolve(hi, hi[::-1]) / 2
    bank = np.eye(4, 1)
    for band in range(1, 4):
        spread = np.zeros((4, 2 * bank.shape[1] - 1))
        spread[:, ::2] = bank  # zeros between the taps
        bank = np.stack([np.convolve(row, lo2) for row in spread])
        start = (bank.shape[1] - hi2.size) // 2
        bank[band, start:start + hi2.size] += hi2
    return torch.as_tensor(bank, dtype=torch.float32)


GEOM_FILTER = torch.tensor(SYM6, dtype=torch.float32) / torch.tensor(SYM6, dtype=torch.float32).sum()  # (12,)
GEOM_PAD = GEOM_FILTER.numel() // 4  # 3: the margin, in input pixels, that the resampling filters need
FILTER_BANK = _filter_bank()  # (4, 43)
BAND_POWER = torch.tensor([10 / 13, 1 / 13, 1 / 13, 1 / 13])  # the expected power of each band (1/f spectrum)
LUMA = torch.tensor([1, 1, 1, 0], dtype=torch.float64).div(math.sqrt(3)).float()  # luma axis in homogeneous RGB
AUGMENT_MIN_SIDE = FILTER_BANK.shape[1] // 2 + 1  # 22: the image filter reflects 21 pixels at each border


def _separable(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Correlates every channel of ``x: (B, C, H, W)`` with ``taps`` along W, then along H (no padding)."""
    channels, taps = x.shape[1], taps.to(x)
    x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def _upsample2(x: torch.Tensor) -> torch.Tensor:
    """2x upsampling with the geometric low-pass filter: zeros inserted after each pixel, then the filter (gain 4,
    i.e. 2 per axis), output ``(B, C, 2H, 2W)``."""
    b, c, h, w = x.shape
    x = F.pad(x.reshape(b, c, h, 1, w, 1), [0, 1, 0, 0, 0, 1]).reshape(b, c, 2 * h, 2 * w)
    n = GEOM_FILTER.numel()
    x = F.pad(x, [(n + 1) // 2, (n - 2) // 2, (n + 1) // 2, (n - 2) // 2])
    return _separable(x, (GEOM_FILTER * 2).flip(0))


def _downsample2(x: torch.Tensor) -> torch.Tensor:
    """The inverse step of ``_upsample2`` on a grid padded by ``2 * GEOM_PAD`` pixels a side: crops what the filter
    does not need, filters and keeps every other pixel: ``(B, C, 2(H + 2 GEOM_PAD), ...) -> (B, C, H, W)``."""
    crop = 2 * GEOM_PAD - (GEOM_FILTER.numel() - 1) // 2
    return _separable(x[:, :, crop:-crop, crop:-crop], GEOM_FILTER)[:, :, ::2, ::2]


def augment_pair(a: torch.Tensor, b: torch.Tensor, p: float = 1.0, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random ADA transform of ``a`` and ``b``, both ``(B, C, H, W)`` float32, C in (1, 3, 4): one draw
    per sample, shared by the pair.

    Each transform applies with probability ``p`` (the reference's strength, 1 in the recipe); the magnitudes are
    StyleGAN2-ADA's defaults (translation 1/8 of the side, log2 scale std 0.2, full-circle rotation, fractional
    translation std 1/8, brightness std 0.2, log2 contrast std 0.5, full-circle hue, log2 saturation std 1, log2
    band gain std 1, noise std 0.1, cutout half the side). Draws come from ``generator`` (which must live on the
    inputs' device) or, when it is None, from the global generator, as the reference does. Needs
    ``H, W >= AUGMENT_MIN_SIDE``. Differentiable in ``a`` and ``b``. Runs in float32 under any autocast (its
    sampling grids and colour matrices in bfloat16 would move pixels by a fraction of a pixel)."""
    if a.shape != b.shape or a.ndim != 4 or a.shape[1] not in (1, 3, 4) or min(a.shape[2:]) < AUGMENT_MIN_SIDE:
        raise ValueError(f"the ADA augmentation needs two batches of one shape (B, 1, 3 or 4, H, W) with H, W >= "
                         f"{AUGMENT_MIN_SIDE}; got {tuple(a.shape)} and {tuple(b.shape)}")
    with torch.autocast(a.device.type, enabled=False):
        return _augment_pair(a.float(), b.float(), p, generator)


def _augment_pair(a: torch.Tensor, b: torch.Tensor, p: float, generator: torch.Generator | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``augment_pair`` on checked float32 inputs, autocast off."""
    batch, channels, height, width = a.shape
    dev = a.device
    rand = lambda *shape: torch.rand(shape, device=dev, generator=generator)
    randn = lambda *shape: torch.randn(shape, device=dev, generator=generator)
    strength = torch.tensor(p, dtype=torch.float32, device=dev)
    chance = lambda *shape: rand(*shape) < strength  # whether each sample gets the transform just drawn

    def drawn(value: torch.Tensor, identity: float, *coin: int) -> torch.Tensor:
        """``value`` where each sample's coin of shape ``coin`` (drawn after the value, as the reference does)
        says so, else ``identity``."""
        return torch.where(chance(*coin), value, torch.full_like(value, identity))

    # geometry: G maps output pixels to input pixels (the inverse of the transform), composed in the reference's order
    g = torch.eye(3, device=dev).expand(batch, 3, 3)
    flip = drawn(torch.floor(rand(batch) * 2), 0, batch)
    g = g @ _scale2(1 / (1 - 2 * flip), 1.0, batch, dev)
    quarter = drawn(torch.floor(rand(batch) * 4), 0, batch)
    g = g @ _rotate2(np.pi / 2 * quarter)
    shift = drawn((rand(batch, 2) * 2 - 1) * 0.125, 0, batch, 1)
    g = g @ _translate2(-torch.round(shift[:, 0] * width), -torch.round(shift[:, 1] * height), batch, dev)
    zoom = drawn(torch.exp2(randn(batch) * 0.2), 1, batch)
    g = g @ _scale2(1 / zoom, 1 / zoom, batch, dev)
    p_rotate = 1 - torch.sqrt((1 - strength).clamp(0, 1))  # a rotation before or after the stretch: P(either) = p
    theta = (rand(batch) * 2 - 1) * np.pi
    g = g @ _rotate2(torch.where(rand(batch) < p_rotate, theta, torch.zeros_like(theta)))
    stretch = 1 / drawn(torch.exp2(randn(batch) * 0.2), 1, batch)
    g = g @ _scale2(stretch, 1 / stretch, batch, dev)
    theta = (rand(batch) * 2 - 1) * np.pi
    g = g @ _rotate2(torch.where(rand(batch) < p_rotate, theta, torch.zeros_like(theta)))
    frac = drawn(randn(batch, 2) * 0.125, 0, batch, 1)
    g = g @ _translate2(-(frac[:, 0] * width), -(frac[:, 1] * height), batch, dev)

    # resample: reflect-pad what the transform brings into view, upsample 2x, sample, filter and decimate
    cx, cy = (width - 1) / 2, (height - 1) / 2
    corners = torch.tensor([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], device=dev)
    reach = (g @ corners.t())[:, :2, :].permute(1, 0, 2).flatten(1)  # (2, B * 4): x, y of the sampled corners
    margin = torch.cat([-reach, reach]).max(dim=1).values  # x0, y0, x1, y1
    margin = margin + torch.tensor([GEOM_PAD * 2 - cx, GEOM_PAD * 2 - cy] * 2, device=dev)
    margin = margin.max(torch.zeros(4, device=dev)).min(torch.tensor([width - 1, height - 1] * 2, device=dev))
    mx0, my0, mx1, my1 = margin.ceil().int().tolist()
    a, b = (F.pad(x, [mx0, mx1, my0, my1], mode="reflect") for x in (a, b))
    g = _translate2((mx0 - mx1) / 2, (my0 - my1) / 2, 1, dev) @ g
    a, b = _upsample2(a), _upsample2(b)
    g = _scale2(2, 2, 1, dev) @ g @ _scale2(0.5, 0.5, 1, dev)
    g = _translate2(-0.5, -0.5, 1, dev) @ g @ _translate2(0.5, 0.5, 1, dev)
    out_h, out_w = (height + GEOM_PAD * 2) * 2, (width + GEOM_PAD * 2) * 2
    g = _scale2(2 / a.shape[3], 2 / a.shape[2], 1, dev) @ g @ _scale2(out_w / 2, out_h / 2, 1, dev)
    grid = F.affine_grid(g[:, :2, :], [batch, channels, out_h, out_w], align_corners=False)
    a, b = (_downsample2(F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
            for x in (a, b))

    # colour: one homogeneous 4x4 matrix per sample, composed in the reference's order
    eye4 = torch.eye(4, device=dev)
    luma = LUMA.to(dev)
    luma_outer = luma.outer(luma)
    brightness = drawn(randn(batch) * 0.2, 0, batch)
    colour = _matrix([[1, 0, 0, brightness], [0, 1, 0, brightness], [0, 0, 1, brightness], [0, 0, 0, 1]], batch, dev)
    contrast = drawn(torch.exp2(randn(batch) * 0.5), 1, batch)
    colour = _matrix([[contrast, 0, 0, 0], [0, contrast, 0, 0], [0, 0, contrast, 0], [0, 0, 0, 1]], batch,
                     dev) @ colour
    luma_flip = drawn(torch.floor(rand(batch, 1, 1) * 2), 0, batch, 1, 1)
    colour = (eye4 - 2 * luma_outer * luma_flip) @ colour  # Householder reflection of the luma axis
    if channels > 1:
        hue = drawn((rand(batch) * 2 - 1) * np.pi, 0, batch)
        colour = _colour_rotation(luma, hue) @ colour
        saturation = drawn(torch.exp2(randn(batch, 1, 1) * 1.0), 1, batch, 1, 1)
        colour = (luma_outer + (eye4 - luma_outer) * saturation) @ colour
    a, b = (_recolour(x, colour) for x in (a, b))

    # image-space filter: a random gain per frequency band (total expected power kept), the same for every channel
    gain = torch.ones(batch, 4, device=dev)
    for band in range(4):
        t_band = drawn(torch.exp2(randn(batch) * 1.0), 1, batch)
        t = torch.ones(batch, 4, device=dev)
        t[:, band] = t_band
        gain = gain * (t / (BAND_POWER.to(dev) * t.square()).sum(dim=-1, keepdim=True).sqrt())
    taps = (gain @ FILTER_BANK.to(dev)).repeat_interleave(channels, 0)  # (B * C, 43)
    a, b = (_filter_per_channel(x, taps) for x in (a, b))

    # additive noise (one field for both) and cutout (one rectangle for both)
    sigma = drawn(randn(batch, 1, 1, 1).abs() * 0.1, 0, batch, 1, 1, 1)
    noise = randn(batch, channels, height, width) * sigma
    a, b = a + noise, b + noise
    size = drawn(torch.full((batch, 2, 1, 1, 1), 0.5, device=dev), 0, batch, 1, 1, 1, 1)
    centre = rand(batch, 2, 1, 1, 1)
    xs = torch.arange(width, device=dev).reshape(1, 1, 1, -1)
    ys = torch.arange(height, device=dev).reshape(1, 1, -1, 1)
    keep = (((xs + 0.5) / width - centre[:, 0]).abs() >= size[:, 0] / 2) | \
        (((ys + 0.5) / height - centre[:, 1]).abs() >= size[:, 1] / 2)
    return a * keep.float(), b * keep.float()


def _recolour(x: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """Applies the homogeneous colour matrices ``(B, 4, 4)`` to ``x: (B, C, H, W)``: RGB as RGB; one channel as
    the mean of the RGB rows; four channels as a full homogeneous vector (the reference's reading of latents)."""
    batch, channels, height, width = x.shape
    x = x.reshape(batch, channels, height * width)
    if channels == 3:
        x = colour[:, :3, :3] @ x + colour[:, :3, 3:]
    elif channels == 1:
        grey = colour[:, :3, :].mean(dim=1, keepdim=True)
        x = x * grey[:, :, :3].sum(dim=2, keepdim=True) + grey[:, :, 3:]
    else:
        x = colour @ x
    return x.reshape(batch, channels, height, width)


def _filter_per_channel(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Correlates channel c of sample i with ``taps[i * C + c]`` along W, then H, borders reflected:
    ``(B, C, H, W) -> (B, C, H, W)``."""
    batch, channels, height, width = x.shape
    half = taps.shape[1] // 2
    x = F.pad(x.reshape(1, batch * channels, height, width), [half] * 4, mode="reflect")
    x = F.conv2d(x, taps[:, None, None, :], groups=batch * channels)
    x = F.conv2d(x, taps[:, None, :, None], groups=batch * channels)
    return x.reshape(batch, channels, height, width)


# ----------------------------------------------------------------------------------------------------- weights
def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, read without running code: ``.safetensors`` by safetensors, anything else by
    ``torch.load(weights_only=True)``. Raises ``ValueError`` naming ``path`` for a missing or unreadable file."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable safetensors file") from err
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:  # never loaded any other way
        raise ValueError(f"{path} is not a torch state dict of plain tensors (a pickled module, such as the "
                         f"reference's vgg.pt, must first be converted to its state_dict())") from err
    if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise ValueError(f"{path} is not a state dict: expected a dict of tensor names to tensors")
    return saved


def load_features(path: str | Path) -> nn.Sequential:
    """The latent VGG16 trunk with the ``features.*`` weights of the file at ``path`` (a state dict of
    ``LatentVGG16``, as ``train_latent_vgg`` writes it; ``classifier.*`` entries are ignored); its input channels
    are read from ``features.0.weight``. Raises ``ValueError`` naming the path and the first missing or misshapen
    entry."""
    path = Path(path)
    saved = read_state_dict(path)
    first = saved.get("features.0.weight")
    if first is None or first.ndim != 4:
        raise ValueError(f"{path} has no 4-D 'features.0.weight': expected a latent VGG16 state dict "
                         f"(train_latent_vgg)")
    features = latent_vgg16_features(first.shape[1])
    state = {}
    for name, wanted in features.state_dict().items():
        found = saved.get(f"features.{name}")
        if found is None:
            raise ValueError(f"{path} has no 'features.{name}': expected a latent VGG16 state dict (train_latent_vgg)")
        if found.shape != wanted.shape:
            raise ValueError(f"{path}: 'features.{name}' has shape {tuple(found.shape)} where the latent VGG16 "
                             f"needs {tuple(wanted.shape)}")
        state[name] = found
    features.load_state_dict(state)
    return features


# ---------------------------------------------------------------------------------------------------- distance
class ELatentLPIPS:
    """The reference's ELatentLPIPS (``ELatentLPIPS2``) as a distance ``(a, b) -> (B,)`` on model-space latents
    ``(B, C, H, W)``, compared as they are (nothing is decoded).

    ``d(a, b) = sum over the 5 taps of mean_hw sum_c (n(f(a')) - n(f(b')))^2``, where ``a', b'`` are ``a, b`` under
    one shared random ADA transform (``augment_pair``, strength ``p``; ``augment=False`` compares them as they are,
    for evaluation and exact comparisons), ``f`` a tap of the frozen trunk from ``weights`` (``load_features``)
    and ``n`` the normalisation of each pixel's feature vector to unit length. Gradients flow into both inputs.
    ``generator``: the augmentation's random draws (on the inputs' device); None: the global generator, as the
    reference. Needs ``H, W >= MIN_SIDE``, and ``>= AUGMENT_MIN_SIDE`` with augmentation.
    """

    MIN_SIDE = 4  # the trunk max-pools twice

    def __init__(self, weights: str | Path, augment: bool = True, p: float = 1.0,
                 generator: torch.Generator | None = None):
        self.weights = Path(weights)
        self.features = load_features(self.weights).eval().requires_grad_(False)
        self.in_channels = self.features[0].in_channels
        if augment and self.in_channels not in (1, 3, 4):
            raise ValueError(f"{self.weights}: a latent VGG16 of {self.in_channels} input channels; the ADA "
                             f"augmentation handles 1, 3 or 4 (use augment=False)")
        self.augment, self.p, self.generator = augment, p, generator

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        side = AUGMENT_MIN_SIDE if self.augment else self.MIN_SIDE
        if a.shape != b.shape or a.ndim != 4 or a.shape[1] != self.in_channels or min(a.shape[2:]) < side:
            raise ValueError(f"ELatentLPIPS needs two latents (B, {self.in_channels}, H, W) of one shape with H, W "
                             f">= {side}; got {tuple(a.shape)} and {tuple(b.shape)}")
        if self.features[0].weight.device != a.device:
            self.features.to(a.device)
        a, b = a.float(), b.float()
        if self.augment:
            a, b = augment_pair(a, b, self.p, self.generator)
        batch, total = a.shape[0], 0
        for tap in feature_taps(self.features, torch.cat([a, b])):
            unit = tap / (tap.square().sum(dim=1, keepdim=True) + 1e-8).sqrt()
            total = total + (unit[:batch] - unit[batch:]).square().sum(dim=1).mean(dim=(1, 2))
        return total


# ---------------------------------------------------------------------------------------------------- training
def train_latent_vgg(dataset: Dataset, out: str | Path, num_classes: int = 1000, epochs: int = 100,
                     batch_size: int = 256, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4,
                     lr_step_epochs: int = 30, lr_gamma: float = 0.1, hidden: int = 4096, seed: int = 0,
                     device: str | torch.device | None = None, num_workers: int = 0) -> Path:
    """Trains ``LatentVGG16`` as a classifier of ``dataset``, a map-style dataset of ``(latent (C, H, W) float
    tensor, label int in [0, num_classes))``, and writes its state dict to ``out`` (safetensors for a
    ``.safetensors`` name, else ``torch.save``), the file ``ELatentLPIPS`` reads. Returns ``out``.

    The defaults are the reference's recipe (sony/cmt@5a99e54 ``imagenet512/train_latent_vgg.py``: SGD, line 82,
    with lr 0.1, momentum 0.9 and weight decay 1e-4 on every parameter, lines 30-32; batch 256, line 28; 100
    epochs, line 35; lr times 0.1 every 30 epochs, ``StepLR`` at line 83 stepped once an epoch, lines 160-161;
    cross-entropy, line 132; dropout on, fp32). Each epoch is one pass over a fresh shuffle, the last short batch
    included; its shuffle and dropout are seeded by ``seed`` and the epoch (the caller's global generators are left
    as they were). ``hidden``: the classifier's hidden width (``LatentVGG16``). After each epoch the training state
    goes to ``<out>.state.pt``; a call that finds it resumes after its last epoch (exactly: the same weights as an
    uninterrupted run on CPU), and the finished run removes it. ``device``: default CUDA when available."""
    out = Path(out)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    latent, _ = dataset[0]
    if not isinstance(latent, torch.Tensor) or latent.ndim != 3:
        raise ValueError(f"train_latent_vgg needs items (latent (C, H, W) tensor, label); the first latent is "
                         f"{type(latent).__name__} of shape {tuple(getattr(latent, 'shape', ()))}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LatentVGG16(latent.shape[0], num_classes, hidden).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=lr_step_epochs, gamma=lr_gamma)
    state_file, start = out.with_name(out.name + ".state.pt"), 0
    if state_file.is_file():
        state = torch.load(state_file, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start = state["epoch"]
    forked = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" \
        else []
    for epoch in range(start, epochs):
        epoch_seed = seed_of(Stream.EPOCH_ORDER, seed, epoch)  # the epoch's shuffle and dropout, resumed or not
        model.train()
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                            generator=torch.Generator().manual_seed(epoch_seed))
        bar = tqdm(loader, desc=f"latent VGG16 epoch {epoch + 1}/{epochs}", dynamic_ncols=True)
        with torch.random.fork_rng(devices=forked):  # the caller's global generators are left as they were
            torch.manual_seed(epoch_seed)
            for latents, labels in bar:
                logits = model(latents.to(device, torch.float32))
                labels = torch.as_tensor(labels, device=device)
                loss = F.cross_entropy(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                accuracy = (logits.argmax(1) == labels).float().mean()
                bar.set_postfix(loss=f"{loss.item():.4f}", top1=f"{accuracy.item():.3f}",
                                lr=schedule.get_last_lr()[0])
        schedule.step()
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "schedule": schedule.state_dict(), "epoch": epoch + 1}, state_file)
    weights = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        publish(out, lambda tmp: save_file(weights, tmp))
    else:
        atomic_save(weights, out)
    state_file.unlink(missing_ok=True)
    return out
