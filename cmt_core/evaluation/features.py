"""Feature extractors for the Frechet distance, and the choice among them.

Every extractor maps images ``(N, C, H, W)`` in [-1, 1] to features ``(N, D)`` (a float32 numpy array) and
carries a ``name`` that names the metric wherever it is reported, so a number is never called FID unless it is:

* ``FID (<mode>)``: ``InceptionFeatures``, clean-fid's Inception from a local file (``EvalConfig.inception_path``).
* ``FD-digits``: ``DigitsClassifierFeatures``, a digit classifier trained here on the training split.
* ``FD-pixels``: ``PixelFeatures``, downsampled pixels, for other image data offline.

``cache_key`` identifies the feature space, so cached reference statistics are never reused across spaces.
``extractor_kind`` makes the choice; its class gives the feature dimension for images of a shape and whether images
of different sizes are comparable (Inception's, which resizes every image to 299 x 299) without being built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from cmt_core.data import POINT_DATA
from cmt_core.evaluation.digits_classifier import DigitsClassifierFeatures
from cmt_core.evaluation.inception import InceptionFeatures
from cmt_core.evaluation.pixels import PixelFeatures


class FeatureExtractor(Protocol):
    name: str
    cache_key: str
    any_size: bool  # whether images of any size are comparable (their features do not depend on it)

    @staticmethod
    def feature_dim(sample_shape: tuple[int, ...]) -> int: ...

    def __call__(self, images: torch.Tensor) -> np.ndarray: ...

    def info(self) -> dict: ...


def extract_features(extractor: FeatureExtractor, images, batch_size: int = 500) -> np.ndarray:
    """Features ``(N, D)`` of ``images`` (a tensor ``(N, C, H, W)`` or an iterable of such batches, e.g. a data
    set's ``batches(batch_size)``), ``batch_size`` images at a time, without autograd."""
    batches = images
    if isinstance(images, torch.Tensor):
        batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    with torch.no_grad():
        return np.concatenate([extractor(batch) for batch in batches])


def extractor_kind(data: str, eval_cfg) -> type:
    """The extractor class for image data named ``data`` (``eval_cfg``: an ``EvalConfig``; inception_path): the one
    place the choice is made. ``InceptionFeatures`` when ``eval_cfg.inception_path`` is set; otherwise
    ``DigitsClassifierFeatures`` for ``digits`` and ``PixelFeatures`` for any other image data. Each class tells,
    without being built, the dimension of its features (``feature_dim(sample_shape)``) and whether it compares images
    of any size (``any_size``)."""
    if data in POINT_DATA:
        raise ValueError(f"{data!r} is 2-D point data: it is scored with distances_2d, not image features")
    if eval_cfg.inception_path is not None:
        return InceptionFeatures
    return DigitsClassifierFeatures if data == "digits" else PixelFeatures


def feature_extractor(data, eval_cfg, cache_dir: str | Path, device: str | torch.device = "cpu") -> FeatureExtractor:
    """The extractor for image data ``data``: its name, or its ``DataConfig`` (name, seed, heldout_fraction), whose
    split seeds the digits classifier; ``eval_cfg``: an ``EvalConfig`` (inception_path, fid_mode).

    The class is ``extractor_kind``'s: Inception from ``eval_cfg.inception_path``; the digits classifier trained on
    the split of ``data`` (cached in ``cache_dir``); downsampled pixels.
    """
    name = data if isinstance(data, str) else data.name
    kind = extractor_kind(name, eval_cfg)
    if kind is InceptionFeatures:
        return InceptionFeatures(eval_cfg.inception_path, eval_cfg.fid_mode, device)
    if kind is DigitsClassifierFeatures:
        split = {} if isinstance(data, str) else {"seed": data.seed, "heldout_fraction": data.heldout_fraction}
        return DigitsClassifierFeatures(cache_dir, device=device, **split)
    return PixelFeatures(device=device)
