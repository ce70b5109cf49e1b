"""Data the pipeline learns: ``load_data(cfg) -> Data``.

``Data.train`` / ``Data.heldout`` are map-style data sets (``cmt_core.data.datasets``) in the model's space
(images in [-1, 1] as ``(C, H, W)``, 2-D points as ``(2,)``), read by index. ``DataConfig.num_classes`` > 0 makes
the data class-conditional: every sample then has a label ``(N,)`` int64 in [0, num_classes) (``ClassLabelError``
says why one is missing or out of range) and training batches carry them; 0 drops the labels of every source
(digits, CIFAR-10, an ``.npz``'s ``labels``, an image folder's), so an unconditional run reads exactly the same
samples in the same order and split. ``Data.encoder`` maps the sample space (what evaluation, grids
and image distances see) to the model space (what training, rollouts and the store hold) and back
(``cmt_core.encoders``; the identity for pixels and 2-D points). Synthetic distributions also carry
``distribution`` (with an exact ``denoise``) and train on fresh samples every step.

Latent data (``data.encoder.kind`` other than ``identity``): ``train`` / ``heldout`` stay the images (what
evaluation scores against); ``load_data(cfg, encoder=<encoder artifact>, latents=<latent store>)`` adds the encoder
and the training split's posterior moments (``cmt_core.data.encoded``), which ``source`` draws latents from;
``model_shape`` is the latents' shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cmt_core.data.datasets import Dataset, TensorDataset
from cmt_core.data.sources import BatchSource, DatasetSource, SyntheticSource
from cmt_core.data.synthetic import Checkerboard, GaussianMixture
from cmt_core.encoders import IDENTITY, Encoder

SYNTHETIC_TRAIN_SIZE = 50_000
POINT_DATA = {"gaussian_mixture": GaussianMixture, "checkerboard": Checkerboard}  # 2-D, with exact denoisers
IMAGE_DATA = ("digits", "npz", "image_folder", "cifar10")
DATA_NAMES = (*POINT_DATA, *IMAGE_DATA)
FILE_DATA = ("npz", "image_folder", "cifar10")  # read from data.path


@dataclass
class Data:
    name: str
    train: Dataset
    heldout: Dataset
    distribution: Any = None  # GaussianMixture | Checkerboard for synthetic data
    encoder: Encoder = field(default=IDENTITY)
    latents: Dataset | None = None  # latent data: the training split's posterior moments (an ``EncodedDataset``)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample in the sample space (an image, a 2-D point)."""
        return tuple(self.train.sample_shape)

    @property
    def model_shape(self) -> tuple[int, ...]:
        """The shape of one sample in the model's space (what networks, rollouts and the store hold)."""
        if self.encoder.name == IDENTITY.name:
            return self.sample_shape
        return tuple(self.encoder.model_shape(self.sample_shape))

    @property
    def num_classes(self) -> int:
        """Class labels the data carries (0: none)."""
        return self.train.num_classes

    @property
    def is_points(self) -> bool:
        return len(self.sample_shape) == 1

    @property
    def exact_denoiser(self):
        return None if self.distribution is None else self.distribution.denoise

    def source(self, seed: int = 0, labels: bool | None = None) -> BatchSource:
        """Training batches ``{"x": (B, *sample_shape), "cond"}``: fresh samples (synthetic) or epochs of ``train``;
        ``labels`` (None: when the data has classes): the batches carry their one-hot class labels
        (``cond["class_labels"]`` ``(B, num_classes)``)."""
        labels = self.num_classes > 0 if labels is None else labels
        if self.distribution is not None:
            return SyntheticSource(self.distribution, seed, labels)
        if self.encoder.name != IDENTITY.name:
            from cmt_core.data.encoded import LatentSource

            if self.latents is None:
                raise ValueError(f"{self.name!r} in the {self.encoder.name} latent space trains on its encoded data "
                                 "set, which this Data was loaded without (load_data's latents)")
            return LatentSource(self.latents, self.encoder, seed, labels)
        return DatasetSource(self.train, seed, labels)


def heldout_split(n: int, seed: int, heldout_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train, heldout)`` of a deterministic split of ``n`` items: a permutation seeded by ``seed``
    whose first ``round(heldout_fraction * n)`` entries are held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_held = int(round(heldout_fraction * n))
    return perm[n_held:], perm[:n_held]


def _points(dist, n: int, g: torch.Generator, num_classes: int) -> TensorDataset:
    """``n`` samples of ``dist`` (with ``num_classes`` > 0: and their classes; the same draws either way)."""
    if not num_classes:
        return TensorDataset(dist.sample(n, g))
    return TensorDataset(*dist.sample_labelled(n, g), num_classes)


def load_images(cfg) -> Data:
    """The image data set ``cfg`` names in its sample space (its encoder left aside), split into ``train`` /
    ``heldout`` subsets of the whole data set (``Subset``: their ``indices`` are rows of the whole one)."""
    from cmt_core.data import images

    whole = images.load_image_dataset(cfg.name, cfg.path, cfg.resolution, cfg.num_classes)
    train, held = heldout_split(len(whole), cfg.seed, cfg.heldout_fraction)
    return Data(cfg.name, whole.subset(train), whole.subset(held))


def load_data(cfg, encoder: Path | None = None, latents: Path | None = None) -> Data:
    """Load (or sample) the data named by ``cfg`` (a ``DataConfig``); the split is deterministic in ``cfg.seed``.
    With ``cfg.num_classes`` > 0 the data carries labels in [0, num_classes) or ``ClassLabelError`` says why not.
    Latent data (``cfg.encoder.kind`` not ``identity``) needs ``encoder``, the encoder stage's artifact folder, and
    to train, ``latents``: the encoded data set's store (its rows split as the images are)."""
    if cfg.name in POINT_DATA:
        dist = (GaussianMixture(cfg.num_modes, cfg.mode_radius, cfg.mode_std, cfg.num_classes)
                if cfg.name == "gaussian_mixture" else Checkerboard(cfg.checker_cells))
        g = torch.Generator().manual_seed(cfg.seed)
        train = _points(dist, SYNTHETIC_TRAIN_SIZE, g, cfg.num_classes)
        return Data(cfg.name, train, _points(dist, SYNTHETIC_TRAIN_SIZE, g, cfg.num_classes), dist)
    data = load_images(cfg)
    if cfg.encoder.kind == "identity":
        return data
    if encoder is None:
        raise ValueError(f"data.encoder.kind={cfg.encoder.kind!r}: loading the data needs the encoder stage's artifact")
    from cmt_core.encoders import load_encoder

    data.encoder = load_encoder(encoder)
    if latents is not None:
        from cmt_core.data.encoded import EncodedDataset

        moments = EncodedDataset(latents, cfg.num_classes)
        whole = len(data.train) + len(data.heldout)
        if len(moments) != whole or moments.model_shape != data.model_shape:
            raise ValueError(f"the latent store {latents} holds {len(moments)} latents of shape {moments.model_shape}; "
                             f"the data has {whole} images, whose latents are {data.model_shape}")
        data.latents = moments.subset(data.train.indices)
    return data
