"""Per-sample distances ``d(a, b)`` of the training objectives, in the conventions of the reference code.

Each takes two batches ``a, b: (B, *shape)`` and returns ``(B,)``. Norms run over *all* of a sample's
dimensions at once (pixels and channels together), so a constant such as pseudo-Huber's ``c`` is per sample:

* ``squared_l2``:   ||a - b||^2                    sony/cmt's mid-training "MSE"
* ``l2_norm``:      ||a - b||                      ECT with c = 0 (over t - r); sony/cmt's "MAE"
* ``pseudo_huber``: sqrt(||a - b||^2 + c^2) - c     ECT with c > 0; a per-dimension c' is c = c' sqrt(dim)
* ``LPIPS``:        VGG16 LPIPS v0.1 of images in [-1, 1], at their own resolution; sony/cmt's default
* ``elatent_lpips``: ELatentLPIPS of latents, a latent VGG16's features under a shared ADA augmentation; sony/cmt's
                    ImageNet-512 distance (``cmt_core.objectives.latent_lpips``)

``mean_squared_error`` (||a - b||^2 / dim) is not one of them: it is the per-dimension mean that the EDM and
Mean Flow objectives are written with, kept so their learning rates and Mean Flow's adaptive-weight epsilon
keep the scale they were tuned on.
"""

from __future__ import annotations

import functools
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from cmt_core.objectives.latent_lpips import ELatentLPIPS

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (B, ...), (B, ...) -> (B,)
DISTANCES = ("squared_l2", "l2_norm", "pseudo_huber", "lpips", "elatent_lpips")  # what ``make_distance`` builds


def squared_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a - b||^2 summed over every dimension of a sample: ``(B, ...) -> (B,)``."""
    return (a - b).flatten(1).square().sum(1)


def l2_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a - b|| over every dimension of a sample: ``(B, ...) -> (B,)``.

    ``vector_norm`` rather than ``sqrt(squared_l2)``: its gradient at a = b is 0, where the square root's is NaN."""
    return torch.linalg.vector_norm((a - b).flatten(1), dim=1)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt(||a - b||^2 + c^2) - c with the norm over the whole sample: ``(B, ...) -> (B,)``.

    ``c`` is per sample (ECT's convention): about ||a - b||^2 / (2c) below c, about ||a - b|| - c above it.
    A per-dimension constant c' (iCT writes c = 0.00054 sqrt(dim)) is c = c' sqrt(dim)."""
    return (squared_l2(a, b) + c**2).sqrt() - c


def mean_squared_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a - b||^2 / dim, the per-dimension mean (EDM and Mean Flow objectives): ``(B, ...) -> (B,)``."""
    return (a - b).flatten(1).square().mean(1)


class LPIPS:
    """LPIPS (Zhang et al. 2018; the ``lpips`` package, VGG16 trunk, v0.1 linear heads) as ``(B, C, H, W) -> (B,)``.

    As sony/cmt does it: images in the model's range [-1, 1] go in at their own resolution (no upsampling to
    224), and the distance is the package's spatially averaged sum over the five VGG stages. The linear heads
    ship inside the package; the VGG16 trunk is read from ``backbone``, a local torchvision VGG16 state dict
    (e.g. ``vgg16-397923af.pth``; its ``features.*`` entries are used), so nothing is downloaded.
    Grayscale images (C = 1) are compared as R = G = B. The trunk pools four times before its last stage,
    so each side must be at least ``MIN_SIDE`` pixels.
    """

    MIN_SIDE = 16

    def __init__(self, backbone: str | Path):
        try:
            import lpips  # only runs that choose LPIPS need it
        except ImportError as err:
            raise ImportError("the LPIPS distance needs the lpips package: pip install 'cmt[fid]'") from err

        self.backbone = Path(backbone)
        with warnings.catch_warnings():  # the package builds torchvision's VGG with the deprecated `pretrained=`
            warnings.simplefilter("ignore", UserWarning)
            self.net = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
        self.net.net.load_state_dict(self._trunk_state(self.net.net.state_dict()))
        self.net.eval().requires_grad_(False)

    def _trunk_state(self, wanted: dict) -> dict:
        """The file's ``features.<i>.*`` tensors under the package's names ``slice<k>.<i>.*``."""
        try:
            saved = torch.load(self.backbone, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:  # not a state dict of plain tensors: never loaded any other way
            raise ValueError(f"{self.backbone} is not a torch state dict of plain tensors") from err
        state = {}
        for name in wanted:
            source = "features." + name.split(".", 1)[1]
            if source not in saved:
                raise ValueError(f"{self.backbone} has no {source!r}: expected torchvision's VGG16 state dict")
            state[name] = saved[source]
        return state

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.ndim != 4 or a.shape[1] not in (1, 3) or min(a.shape[2:]) < self.MIN_SIDE:
            raise ValueError(f"LPIPS needs images (B, 1 or 3, H, W) with H, W >= {self.MIN_SIDE}; got {tuple(a.shape)}")
        if self.net.scaling_layer.shift.device != a.device:
            self.net.to(a.device)
        a, b = a.float().expand(-1, 3, -1, -1), b.float().expand(-1, 3, -1, -1)
        return self.net(a, b).flatten()


def make_distance(name: str, huber_c: float = 0.0, lpips_backbone: str | Path | None = None) -> Distance:
    """The distance called ``name`` (one of ``DISTANCES``); ``huber_c`` is per sample, see ``pseudo_huber``;
    ``lpips_backbone`` is the weights file of the distance's network: torchvision's VGG16 for ``lpips``, the latent
    VGG16 (``latent_lpips.train_latent_vgg``) for ``elatent_lpips``, which augments as the reference trains."""
    if name == "squared_l2":
        return squared_l2
    if name == "l2_norm":
        return l2_norm
    if name == "pseudo_huber":
        return functools.partial(pseudo_huber, c=huber_c)
    if name == "lpips":
        if lpips_backbone is None:
            raise ValueError("the LPIPS distance needs a local VGG16 weights file (lpips_backbone)")
        return LPIPS(lpips_backbone)
    if name == "elatent_lpips":
        if lpips_backbone is None:
            raise ValueError("the ELatentLPIPS distance needs a local latent VGG16 weights file (lpips_backbone)")
        return ELatentLPIPS(lpips_backbone)
    raise ValueError(f"unknown distance {name!r}; choose one of {DISTANCES}")
