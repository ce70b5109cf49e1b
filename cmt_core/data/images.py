"""Image data sets of float images ``(C, H, W)`` in [-1, 1], read from local files only.

* ``digits``: ships with scikit-learn (1,797 grey 8x8 images, values 0..16), with its 10 class labels.
* ``npz``: array ``images`` of a ``.npz``, ``(N, H, W, C)`` or ``(N, C, H, W)``, uint8 or float in [0, 1]
  (held in memory).
* ``image_folder``: every PNG / JPEG under a folder (recursively, sorted by path), RGB or, if all are grey, L;
  decoded when read (``ImageFolderDataset``: only paths and headers are held).
* ``cifar10``: the python-pickle release (``cifar-10-batches-py/data_batch_1..5``), training batches only, with
  their 10 class labels.

``DataConfig.resolution``, when set, makes images square at that size: a non-square image is centre-cropped
to a square, then resized with antialiased bilinear interpolation. Nothing is ever downloaded.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from cmt_core.data.datasets import Dataset, TensorDataset

try:
    from numpy._core.multiarray import _reconstruct  # numpy 2
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{k}" for k in range(1, 6))


def to_model_range(pixels: np.ndarray, max_value: float) -> torch.Tensor:
    """uint8-like pixels in [0, max_value] -> float32 in [-1, 1]."""
    return torch.from_numpy(np.asarray(pixels, dtype=np.float32) / max_value * 2 - 1)


def resize(images: torch.Tensor, resolution: int | None) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, C, r, r)``: centre crop to a square, then antialiased bilinear resize."""
    if resolution is None or images.shape[-2:] == (resolution, resolution):
        return images
    h, w = images.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    images = images[..., top:top + side, left:left + side]
    if side != resolution:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True,
                               align_corners=False)
    return images.clamp(-1, 1)


DIGITS_CLASSES = CIFAR10_CLASSES = 10


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 digits ``(N, 1, 8, 8)`` and their labels ``(N,)`` int64 (0..9)."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    return to_model_range(digits.images[:, None], 16.0), torch.from_numpy(digits.target.astype(np.int64))


def load_npz(path: Path) -> torch.Tensor:
    """The ``images`` array of ``path`` as ``(N, C, H, W)``; channels are the axis (1 or 3) of size 1 or 3."""
    archive = np.load(path)
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is not an .npz archive (expected one holding an array 'images')")
    with archive:
        if "images" not in archive.files:
            raise ValueError(f"{path} has no array 'images' (arrays: {archive.files})")
        pixels = archive["images"]
    if pixels.ndim != 4:
        raise ValueError(f"{path}: 'images' must be (N, H, W, C) or (N, C, H, W), got shape {pixels.shape}")
    channels_last, channels_first = pixels.shape[-1] in (1, 3), pixels.shape[1] in (1, 3)
    if channels_last and channels_first:  # e.g. (N, 3, 3, 3): images are square, so H == W decides
        channels_last = pixels.shape[1] == pixels.shape[2]
    elif not (channels_last or channels_first):
        raise ValueError(f"{path}: no channel axis of size 1 or 3 in 'images' of shape {pixels.shape}")
    if channels_last:
        pixels = pixels.transpose(0, 3, 1, 2)
    if np.issubdtype(pixels.dtype, np.floating):
        if pixels.size and (pixels.min() < 0 or pixels.max() > 1):
            raise ValueError(f"{path}: float 'images' must lie in [0, 1], got [{pixels.min()}, {pixels.max()}]")
        return to_model_range(pixels, 1.0)
    if pixels.dtype != np.uint8:
        raise ValueError(f"{path}: 'images' must be uint8 or float in [0, 1], got dtype {pixels.dtype}")
    return to_model_range(pixels, 255.0)


class ImageFolderDataset(Dataset):
    """Every PNG / JPEG under ``folder``, decoded when read; they must share one size unless ``resolution`` is given.

    Only the sorted paths and each file's header (mode, size) are read up front: the images are "L" when every file
    is grey, else RGB, and each is centre-cropped and resized to ``resolution`` (``resize``) when it is read."""

    def __init__(self, folder: Path, resolution: int | None):
        from PIL import Image

        self.files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise FileNotFoundError(f"no PNG / JPEG images under {folder}")
        headers = {}
        for f in self.files:  # Image.open reads only the header: mode and size without decoding
            with Image.open(f) as img:
                headers[f] = (img.mode, img.size)
        self.mode = "L" if all(m in ("1", "L", "LA") for m, _ in headers.values()) else "RGB"
        sizes = {size: f for f, (_, size) in headers.items()}
        if resolution is None and len(sizes) > 1:
            (size_a, file_a), (size_b, file_b) = list(sizes.items())[:2]
            raise ValueError(f"images differ in size ({file_a}: {size_a}, {file_b}: {size_b}); set data.resolution")
        self.resolution = resolution
        width, height = next(iter(sizes))
        side = resolution or height
        self.sample_shape = (1 if self.mode == "L" else 3, side, side if resolution else width)

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, idx: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        out = []
        for k in idx.tolist():
            with Image.open(self.files[k]) as img:
                pixels = np.asarray(img.convert(self.mode), dtype=np.uint8).reshape(img.height, img.width, -1)
            out.append(resize(to_model_range(pixels.transpose(2, 0, 1)[None], 255.0), self.resolution))
        return torch.cat(out) if out else torch.empty(0, *self.sample_shape)


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle asked for a global its format does not need; nothing of it was run."""


class CifarUnpickler(pickle.Unpickler):
    """Reads a CIFAR-10 python batch (a dict of bytes, lists and numpy arrays) without running code: the only
    globals it resolves are numpy's array reconstruction, ``ndarray`` and ``dtype``; any other is refused by name."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise ForbiddenGlobal(f"refused global {module}.{name}: a CIFAR-10 batch does not need it "
                                  "(nothing of the file was run)")
        return getattr(np, name) if module == "numpy" else _reconstruct


def load_cifar10(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The 50,000 CIFAR-10 training images ``(N, 3, 32, 32)`` and labels ``(N,)`` int64; ``path`` is the batches
    folder or its parent."""
    is_batches_folder = path.name == CIFAR10_FOLDER or (path / CIFAR10_TRAIN_BATCHES[0]).exists()
    folder = path if is_batches_folder else path / CIFAR10_FOLDER
    batches, labels = [], []
    for name in CIFAR10_TRAIN_BATCHES:
        file = folder / name
        if not file.is_file():
            raise FileNotFoundError(f"CIFAR-10 training batch {file} not found (data.path must be the "
                                    f"{CIFAR10_FOLDER} folder of the python release, or its parent)")
        with file.open("rb") as fh:
            try:
                batch = CifarUnpickler(fh, encoding="bytes").load()
            except ForbiddenGlobal as err:
                raise ValueError(f"data.path: {file} is not a CIFAR-10 batch: {err}") from None
        rows = batch[b"data"] if b"data" in batch else batch["data"]
        batches.append(np.asarray(rows, dtype=np.uint8).reshape(-1, 3, 32, 32))  # rows are R, G, B planes
        labels.append(np.asarray(batch[b"labels"] if b"labels" in batch else batch["labels"], dtype=np.int64))
    return to_model_range(np.concatenate(batches), 255.0), torch.from_numpy(np.concatenate(labels))


def load_image_dataset(name: str, path: Path | None, resolution: int | None) -> Dataset:
    """The whole image data set ``name`` (the caller splits train / held-out): in memory, or, for an image folder,
    decoded when read."""
    if name == "image_folder":
        return ImageFolderDataset(Path(path), resolution)
    if name == "digits":
        images, labels = load_digits()
        return TensorDataset(resize(images, resolution), labels, DIGITS_CLASSES)
    if name == "cifar10":
        images, labels = load_cifar10(Path(path))
        return TensorDataset(resize(images, resolution), labels, CIFAR10_CLASSES)
    if name == "npz":
        return TensorDataset(resize(load_npz(Path(path)), resolution))
    raise ValueError(f"unknown image dataset {name!r}")
