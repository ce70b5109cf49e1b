"""Inception-V3 pool features computed the way clean-fid computes them, from a LOCAL weights file.

clean-fid downloads its weights at run time; offline, ``EvalConfig.inception_path`` points at a local copy
and nothing is downloaded. The three modes follow ``cleanfid.features.build_feature_extractor``:

* ``clean``: the TorchScript file ``inception-2015-12-05.pt``; every image is resized to 299 x 299 by
  clean-fid's own resizer (``cleanfid.resize.build_resizer('clean')``: PIL bicubic on float channels), then
  ``model.layers((x - 128) / 128)`` gives the 2048-d pool features (as ``cleanfid.inception_torchscript.InceptionV3W``
  does with ``resize_inside=False``).
* ``legacy_tensorflow``: the same TorchScript file called as ``model(x, return_features=True)`` on 0..255
  images of any size; the model resizes inside, as TensorFlow's FID code did.
* ``legacy_pytorch``: pytorch-fid's Inception (``pt_inception-2015-12-05-6726825d.pth``, a state dict, not
  TorchScript), fed 299 x 299 images from a PyTorch bilinear resize, as clean-fid's ``pytorch_inception``.

Images arrive as ``(N, C, H, W)`` in [-1, 1]; grey images are repeated to 3 channels and every image is
quantised to uint8 first (``x * 127.5 + 128``, EDM's convention), so the features equal clean-fid's on the
same images saved as PNG files.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from cmt_core.data.images import to_uint8

FidMode = Literal["clean", "legacy_pytorch", "legacy_tensorflow"]
FEATURE_DIM = 2048


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` in [-1, 1] -> ``(N, 3, H, W)`` uint8 (grey repeated to RGB)."""
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    if images.shape[1] != 3:
        raise ValueError(f"Inception features need 1 or 3 channels, got {images.shape[1]}")
    return to_uint8(images)


def _file_digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def pytorch_fid_inception_architecture() -> torch.nn.Module:
    """pytorch-fid's FID Inception (torchvision's, with clean-fid's patched blocks), randomly initialised."""
    import torchvision
    from cleanfid import inception_pytorch as ip

    net = torchvision.models.inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False)
    net.Mixed_5b, net.Mixed_5c = ip.FIDInceptionA(192, 32), ip.FIDInceptionA(256, 64)
    net.Mixed_5d = ip.FIDInceptionA(288, 64)
    net.Mixed_6b, net.Mixed_6c = ip.FIDInceptionC(768, 128), ip.FIDInceptionC(768, 160)
    net.Mixed_6d, net.Mixed_6e = ip.FIDInceptionC(768, 160), ip.FIDInceptionC(768, 192)
    net.Mixed_7b, net.Mixed_7c = ip.FIDInceptionE_1(1280), ip.FIDInceptionE_2(2048)
    return net


def _pytorch_fid_pool_features(state_dict_path: Path) -> torch.nn.Module:
    """The FID Inception loaded from a local state dict, up to the final average pool: ``(N, 2048, 1, 1)``."""
    net = pytorch_fid_inception_architecture()
    net.load_state_dict(torch.load(state_dict_path, map_location="cpu", weights_only=True))
    return torch.nn.Sequential(
        net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, torch.nn.MaxPool2d(3, 2),
        net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, torch.nn.MaxPool2d(3, 2),
        net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c, net.Mixed_6d,
        net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, torch.nn.AdaptiveAvgPool2d(1),
    ).eval()


class InceptionFeatures:
    """2048-d Inception features of ``(N, C, H, W)`` images in [-1, 1]; the metric is ``FID (<mode>)``. Every image
    is resized to 299 x 299 first, so images of any size are comparable (``any_size``)."""

    any_size = True

    @staticmethod
    def feature_dim(sample_shape: tuple[int, ...]) -> int:
        """2048, for images of any shape."""
        return FEATURE_DIM

    def __init__(self, path: str | Path, mode: FidMode = "clean", device: str | torch.device = "cpu"):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"Inception weights not found at {self.path} (EvalConfig.inception_path)")
        self.mode = mode
        self.device = torch.device(device)
        self.name = f"FID ({mode})"
        self.dim = FEATURE_DIM
        self.cache_key = f"inception-{mode}-{_file_digest(self.path)}"
        if mode == "legacy_pytorch":
            self.model = _pytorch_fid_pool_features(self.path).to(self.device)
        elif mode in ("clean", "legacy_tensorflow"):
            with warnings.catch_warnings():
                # clean-fid's weights exist only as TorchScript, which torch 2.14 marks as deprecated.
                warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=FutureWarning)
                self.model = torch.jit.load(str(self.path), map_location=self.device).eval()
        else:
            raise ValueError(f"unknown FID mode {mode!r}")
        from cleanfid.resize import build_resizer  # the [fid] extra

        self._resize = build_resizer("clean") if mode == "clean" else None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """``images: (N, C, H, W)`` in [-1, 1] -> features ``(N, 2048)`` float32."""
        x = to_uint8_rgb(images.cpu())
        n = x.shape[0]
        if self.mode == "clean":
            hwc = x.permute(0, 2, 3, 1).numpy()
            x = torch.from_numpy(np.stack([self._resize(img) for img in hwc])).permute(0, 3, 1, 2)
            feats = self.model.layers.forward((x.to(self.device) - 128) / 128)
        elif self.mode == "legacy_tensorflow":
            feats = self.model(x.to(self.device, torch.float32), return_features=True)
        else:
            x = F.interpolate(x.to(self.device, torch.float32), size=(299, 299), mode="bilinear", align_corners=False)
            feats = self.model(2 * x.clamp(0, 255) / 255 - 1)
        return feats.reshape(n, FEATURE_DIM).float().cpu().numpy()

    def info(self) -> dict:
        return {"extractor": self.name, "feature_dim": self.dim, "weights": str(self.path)}
