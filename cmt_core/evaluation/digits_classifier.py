"""A small CNN digit classifier whose penultimate layer is the feature space of the ``FD-digits`` metric.

Inception needs weights we may not download; on scikit-learn's 8x8 digits a classifier trained here, on the
TRAINING split only, gives a meaningful feature space instead. The metric is therefore called ``FD-digits``
(Frechet distance in digits-classifier features), never FID. Training is deterministic (fixed seed, a few
seconds on CPU); the state dict and its held-out accuracy are cached in a directory the caller gives.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmt_core.data import heldout_split
from cmt_core.data.images import load_digits

FEATURE_DIM = 64
EPOCHS = 20
BATCH_SIZE = 64
LR = 2e-3
ARTIFACT_VERSION = 1  # bump when the architecture or the recipe changes: old caches are then ignored


def load_digits_split(seed: int = 0, heldout_fraction: float = 0.2):
    """Digits images ``(N, 1, 8, 8)`` in [-1, 1] with labels ``(N,)``, split by ``cmt_core.data.heldout_split``
    as ``cmt_core.data.load_data`` splits them: ``(train_x, train_y, heldout_x, heldout_y)``."""
    images, labels = load_digits()
    train, held = heldout_split(len(images), seed, heldout_fraction)
    return images[train], labels[train], images[held], labels[held]


class DigitsCNN(nn.Module):
    """``(B, 1, 8, 8)`` -> logits ``(B, 10)``; ``features`` gives the penultimate layer ``(B, FEATURE_DIM)``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 4, 4)
            nn.Flatten(), nn.Linear(32 * 16, 128), nn.ReLU(),
            nn.Linear(128, FEATURE_DIM),
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # Pre-activation features: no dead ReLU units, so the feature covariance stays full rank.
        if x.shape[-2:] != (8, 8):
            x = F.adaptive_avg_pool2d(x, (8, 8))
        return self.conv(x)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Penultimate ``features: (B, FEATURE_DIM)`` -> logits ``(B, 10)``."""
        return self.head(F.relu(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(x))


@contextlib.contextmanager
def _one_thread():
    # Batches of 64 8x8 images are too small to split across threads: on a busy 2-core machine two
    # threads made training ~7x slower than one (56 s vs 8 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_digits_cnn(train_x: torch.Tensor, train_y: torch.Tensor, seed: int = 0) -> DigitsCNN:
    """Adam, ``EPOCHS`` epochs, with a random one-pixel shift as augmentation; deterministic in ``seed``."""
    with torch.random.fork_rng(devices=[]), _one_thread():
        torch.manual_seed(seed)
        return _train(DigitsCNN(), train_x, train_y, seed)


def _train(net: DigitsCNN, train_x: torch.Tensor, train_y: torch.Tensor, seed: int) -> DigitsCNN:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS)
    net.train()
    for _ in range(EPOCHS):
        perm = torch.randperm(len(train_x), generator=g)
        for i in range(0, len(perm), BATCH_SIZE):
            idx = perm[i:i + BATCH_SIZE]
            x = _random_shift(train_x[idx], g)
            loss = F.cross_entropy(net(x), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return net.eval()


def _random_shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Shift the whole batch by up to one pixel, filling with background (-1)."""
    dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    return padded[..., 1 + dy:1 + dy + x.shape[-2], 1 + dx:1 + dx + x.shape[-1]]


@torch.no_grad()
def accuracy(net: DigitsCNN, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((net(x).argmax(1) == y).float().mean())


class DigitsClassifierFeatures:
    """Penultimate ``(N, 64)`` features of a digit CNN trained on the training split; metric ``FD-digits``; its
    predicted classes (``predict``) give conditional samples' ``class_accuracy``.

    ``cache_dir/digits_classifier_{split}.pt`` (state dict) and ``.json`` (held-out accuracy) are reused when
    present; ``trained_now`` says whether this construction trained the network.
    """

    name = "FD-digits"
    any_size = False  # a digits classifier compares 8x8 digits: images of another shape are refused, not pooled

    @staticmethod
    def feature_dim(sample_shape: tuple[int, ...]) -> int:
        """``FEATURE_DIM`` (64)."""
        return FEATURE_DIM

    def __init__(self, cache_dir: str | Path, seed: int = 0, heldout_fraction: float = 0.2,
                 device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.seed, self.heldout_fraction = seed, heldout_fraction
        self.dim = FEATURE_DIM
        split = f"v{ARTIFACT_VERSION}_seed{seed}_held{heldout_fraction:g}"
        self.cache_key = f"digits-clf-{split}"
        self.weights_path = Path(cache_dir) / f"digits_classifier_{split}.pt"
        self.meta_path = self.weights_path.with_suffix(".json")
        train_x, train_y, held_x, held_y = load_digits_split(seed, heldout_fraction)
        self.heldout_images = held_x
        self.net = DigitsCNN()
        self.trained_now = not (self.weights_path.exists() and self.meta_path.exists())
        if self.trained_now:
            self._train_and_save(train_x, train_y, held_x, held_y)
        else:
            self.net.load_state_dict(torch.load(self.weights_path, map_location="cpu", weights_only=True))
            self.heldout_accuracy = json.loads(self.meta_path.read_text())["heldout_accuracy"]
        self.net = self.net.to(self.device).eval()

    def _train_and_save(self, train_x, train_y, held_x, held_y) -> None:
        self.net = train_digits_cnn(train_x, train_y, self.seed)
        self.heldout_accuracy = accuracy(self.net, held_x, held_y) if len(held_y) else float("nan")
        self.weights_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.net.state_dict(), self.weights_path)
        meta = {"heldout_accuracy": self.heldout_accuracy, "train_size": len(train_y), "heldout_size": len(held_y),
                "seed": self.seed, "heldout_fraction": self.heldout_fraction, "epochs": EPOCHS}
        self.meta_path.write_text(json.dumps(meta, indent=2))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """``images: (N, 1, H, W)`` in [-1, 1] -> features ``(N, 64)`` float32."""
        if images.shape[1] != 1:
            raise ValueError(f"the digits classifier takes grey images, got {images.shape[1]} channels")
        return self.net.features(images.to(self.device, torch.float32)).cpu().numpy()

    @torch.no_grad()
    def predict(self, features: np.ndarray) -> np.ndarray:
        """The classes ``(N,)`` int64 the network assigns to images whose features ``(N, 64)`` (``__call__``) are
        given."""
        return self.net.logits(torch.as_tensor(features, device=self.device)).argmax(1).cpu().numpy()

    def info(self) -> dict:
        return {"extractor": self.name, "feature_dim": self.dim, "heldout_accuracy": self.heldout_accuracy,
                "classifier": str(self.weights_path)}
