"""Image data sets of float images ``(C, H, W)`` in [-1, 1], read from local files only.

* ``digits``: ships with scikit-learn (1,797 grey 8x8 images, values 0..16), with its 10 class labels.
* ``npz``: array ``images`` of a ``.npz``, ``(N, H, W, C)`` or ``(N, C, H, W)``, uint8 or float in [0, 1], and
  optionally an integer array ``labels`` ``(N,)`` (held in memory).
* ``image_folder``: every PNG / JPEG under a folder (recursively) or in a ``.zip`` archive as EDM's dataset_tool
  writes it, sorted by relative path, RGB or, if all are grey, L; decoded when read (``ImageFolderDataset``: only
  names, headers and labels are held). Labels: see ``ImageFolderDataset``.
* ``cifar10``: the python-pickle release (``cifar-10-batches-py/data_batch_1..5``), training batches only, with
  their 10 class labels.

Class labels are read only when asked for (``num_classes`` > 0, ``DataConfig.num_classes``): then every sample
has one, ``(N,)`` int64 in [0, num_classes), or ``ClassLabelError`` says why not; with ``num_classes`` 0 they are
neither read nor checked, and the data set has none.

``DataConfig.resolution``, when set, makes images square at that size: a non-square image is centre-cropped
to a square, then resized with antialiased bilinear interpolation. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch.nn import functional as F

from cmt_core.data.datasets import Dataset, TensorDataset, check_labels, labels_error

try:
    from numpy._core.multiarray import _reconstruct  # numpy 2
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DATASET_JSON = "dataset.json"  # EDM / EDM2 dataset_tool's labels: {"labels": [["relative/path.png", int], ...] | null}
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{k}" for k in range(1, 6))


def to_model_range(pixels: np.ndarray, max_value: float) -> torch.Tensor:
    """uint8-like pixels in [0, max_value] -> float32 in [-1, 1]."""
    return torch.from_numpy(np.asarray(pixels, dtype=np.float32) / max_value * 2 - 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 of the same shape: ``x * 127.5 + 128`` clipped to [0, 255] and rounded down (EDM's
    convention when it saves images). ``to_model_range(u, 255)`` is the centre of the bin that maps back to ``u``, so
    uint8 -> [-1, 1] -> uint8 is exact."""
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8)


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


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 digits ``(N, 1, 8, 8)`` and their labels ``(N,)`` int64 (0..9)."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    return to_model_range(digits.images[:, None], 16.0), torch.from_numpy(digits.target.astype(np.int64))


def load_npz(path: Path, num_classes: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``images`` array of ``path`` as ``(N, C, H, W)``, channels the axis (1 or 3) of size 1 or 3, and, with
    ``num_classes`` > 0, its ``labels`` ``(N,)`` int64 in [0, num_classes) (else None: not read)."""
    archive = np.load(path)
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is not an .npz archive (expected one holding an array 'images')")
    with archive:
        if "images" not in archive.files:
            raise ValueError(f"{path} has no array 'images' (arrays: {archive.files})")
        pixels = archive["images"]
        labels = npz_labels(archive, path, len(pixels), num_classes) if num_classes else None
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
        return to_model_range(pixels, 1.0), labels
    if pixels.dtype != np.uint8:
        raise ValueError(f"{path}: 'images' must be uint8 or float in [0, 1], got dtype {pixels.dtype}")
    return to_model_range(pixels, 255.0), labels


def npz_labels(archive, path: Path, n: int, num_classes: int) -> torch.Tensor:
    """The array ``labels`` of the open ``.npz`` ``archive``: ``(n,)`` integers, as int64."""
    if "labels" not in archive.files:
        raise labels_error(num_classes, f"the npz file {path} has no array 'labels'")
    labels = archive["labels"]
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise labels_error(num_classes, f"the array 'labels' of {path} is {labels.dtype} of shape {labels.shape}, "
                                        f"not integers of shape ({n},), one per image")
    return torch.from_numpy(labels.astype(np.int64))


class ImageFolderDataset(Dataset):
    """Every PNG / JPEG under the folder ``path`` (recursively), or in the ``.zip`` archive ``path`` (EDM's
    dataset_tool's), sorted by relative path and decoded when read; they must share one size unless ``resolution``.

    Only the names, each file's header (mode, size) and the labels are read up front: the images are "L" when every
    file is grey, else RGB, and each is centre-cropped and resized to ``resolution`` (``resize``) when it is read.
    An archive is opened when first read in each process, so that forked data-loader workers never share one.

    Labels ``(N,)`` int64, read only with ``num_classes`` > 0 (else the data set has none), as EDM / EDM2 read them:

    * a ``dataset.json`` at the root (``{"labels": [["relative/path.png", int], ...]}``) gives each image's label;
      it must name every image and only images that exist. ``{"labels": null}`` means no labels: the subfolders of
      such a data set are not classes (dataset_tool shards its images into ``00000/``, ``00001/``, ...);
    * without one, each immediate subfolder is a class, its index its position among the sorted subfolder names
      (ImageNet's ``n01440764/`` ...). An image lying at the root can be given no class: labels are then refused,
      naming it, rather than guessed (the images still read unconditionally)."""

    def __init__(self, path: Path, resolution: int | None, num_classes: int = 0):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        self.path, self.resolution, self.is_zip = path, resolution, not path.is_dir()
        if self.is_zip and (path.suffix.lower() != ".zip" or not path.is_file()):
            raise ValueError(f"{path} is neither a folder of images nor a .zip archive")
        self._zip, self._zip_pid = None, None
        self.where = f"the {'zip archive' if self.is_zip else 'image folder'} {path}"
        self.names = sorted(self._image_names(), key=PurePosixPath)  # relative paths, '/'-separated
        if not self.names:
            raise FileNotFoundError(f"no PNG / JPEG images under {path}")
        headers = {}
        for name in self.names:  # Image.open reads only the header: mode and size without decoding
            with self._open(name) as img:
                headers[name] = (img.mode, img.size)
        self.mode = "L" if all(m in ("1", "L", "LA") for m, _ in headers.values()) else "RGB"
        sizes = {size: name for name, (_, size) in headers.items()}
        if resolution is None and len(sizes) > 1:
            (size_a, file_a), (size_b, file_b) = list(sizes.items())[:2]
            raise ValueError(f"images differ in size ({file_a}: {size_a}, {file_b}: {size_b}); set data.resolution")
        width, height = next(iter(sizes))
        side = resolution or height
        self.sample_shape = (1 if self.mode == "L" else 3, side, side if resolution else width)
        self.num_classes = num_classes
        self.class_labels = self._find_labels() if num_classes else None

    def __len__(self) -> int:
        return len(self.names)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zip": None}  # an open archive stays with its process

    def _archive(self) -> zipfile.ZipFile:
        """The zip archive, opened once per process (a forked worker must not share its parent's file offset)."""
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip

    def _image_names(self) -> list[str]:
        if self.is_zip:
            return [n for n in self._archive().namelist() if not n.endswith("/") and
                    PurePosixPath(n).suffix.lower() in IMAGE_SUFFIXES]
        return [p.relative_to(self.path).as_posix() for p in self.path.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]

    @contextmanager
    def _open(self, name: str):
        """The image ``name`` opened with PIL (its header read, its pixels not yet decoded)."""
        from PIL import Image

        if not self.is_zip:
            with Image.open(self.path / name) as img:
                yield img
            return
        with self._archive().open(name) as fh, Image.open(fh) as img:
            yield img

    def _dataset_json(self):
        """The parsed ``dataset.json`` at the root, or None where there is none."""
        if self.is_zip:
            try:
                text = self._archive().read(DATASET_JSON)
            except KeyError:
                return None
        elif (self.path / DATASET_JSON).is_file():
            text = (self.path / DATASET_JSON).read_bytes()
        else:
            return None
        try:
            return json.loads(text)
        except ValueError as err:
            raise labels_error(self.num_classes, f"the {DATASET_JSON} of {self.where} is not JSON ({err})") from None

    def _find_labels(self) -> torch.Tensor:
        """Each image's label ``(N,)`` int64 in [0, num_classes) (class docstring), or ``ClassLabelError``."""
        meta = self._dataset_json()
        labels = self._subfolder_labels() if meta is None else self._json_labels(meta)
        return check_labels(torch.tensor(labels, dtype=torch.int64), self.num_classes, f"the labels of {self.where}")

    def _json_labels(self, meta) -> list[int]:
        """Each image's label as the parsed ``dataset.json`` ``meta`` gives it."""
        of = f"the {DATASET_JSON} of {self.where}"
        entries = meta.get("labels") if isinstance(meta, dict) else None
        if isinstance(meta, dict) and "labels" in meta and entries is None:
            raise labels_error(self.num_classes, f"{of} says it has none (\"labels\": null)")
        if not isinstance(entries, list) or not all(
                isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and type(e[1]) is int for e in entries):
            raise labels_error(self.num_classes, f"{of} is not {{\"labels\": [[\"relative/path.png\", integer "
                                                 "label], ...]}")
        given, names = dict(entries), set(self.names)
        unlabelled = next((n for n in self.names if n not in given), None)
        if unlabelled is not None:
            raise labels_error(self.num_classes, f"{of} gives no label for the image {unlabelled!r}")
        stray = next((n for n in given if n not in names), None)
        if stray is not None:
            raise labels_error(self.num_classes, f"{of} labels {stray!r}, which is no image of it")
        return [given[n] for n in self.names]

    def _subfolder_labels(self) -> list[int]:
        """Each image's class: the position of its top folder among the sorted top folders."""
        tops = [PurePosixPath(n).parts for n in self.names]
        at_root = next(("/".join(parts) for parts in tops if len(parts) == 1), None)
        if at_root is not None:
            missing = ("no class subfolders" if all(len(parts) == 1 for parts in tops) else
                       f"the image {at_root!r} at its root beside its class subfolders, which no class can be given")
            raise labels_error(self.num_classes, f"{self.where} has no {DATASET_JSON} and {missing}")
        classes = {name: k for k, name in enumerate(sorted({parts[0] for parts in tops}))}
        return [classes[parts[0]] for parts in tops]

    def _read(self, idx: torch.Tensor) -> torch.Tensor:
        out = []
        for k in idx.tolist():
            with self._open(self.names[k]) as img:
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


NATIVE_SHAPES = {"digits": (1, 8, 8), "cifar10": (3, 32, 32)}  # the embedded / fixed-size data sets' images


def pixel_shape(cfg) -> tuple[int, int, int]:
    """The images' shape ``(C, H, W)`` of the ``DataConfig`` ``cfg`` without reading them: the native shape of a
    fixed-size data set or ``(3, R, R)`` at ``data.resolution`` R (which a data set of files needs here: its
    images' sizes are its own)."""
    if cfg.name in NATIVE_SHAPES:
        c, h, w = NATIVE_SHAPES[cfg.name]
        return (c, h, w) if cfg.resolution is None else (c, cfg.resolution, cfg.resolution)
    if cfg.resolution is None:
        raise ValueError(f"data.resolution is required for data.name={cfg.name!r} in a latent space: the latents' "
                         "shape is fixed before any image is read")
    return 3, cfg.resolution, cfg.resolution


def load_image_dataset(name: str, path: Path | None, resolution: int | None, num_classes: int = 0) -> Dataset:
    """The whole image data set ``name`` (the caller splits train / held-out): in memory, or, for an image folder,
    decoded when read; with ``num_classes`` > 0 its labels, each in [0, num_classes) (else ``ClassLabelError``),
    with 0 none."""
    if name == "image_folder":
        return ImageFolderDataset(Path(path), resolution, num_classes)
    if name == "digits":
        (images, labels), source = load_digits(), "the labels of scikit-learn's digits"
    elif name == "cifar10":
        (images, labels), source = load_cifar10(Path(path)), f"the labels of CIFAR-10 at {path}"
    elif name == "npz":
        (images, labels), source = load_npz(Path(path), num_classes), f"the labels of {path} (its array 'labels')"
    else:
        raise ValueError(f"unknown image dataset {name!r}")
    if not num_classes:
        return TensorDataset(resize(images, resolution))
    return TensorDataset(resize(images, resolution), check_labels(labels, num_classes, source), num_classes)
