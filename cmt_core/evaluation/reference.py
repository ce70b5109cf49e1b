"""Sample sets and reference statistics read from files: what ``cmt fid`` scores, and what ``eval.reference_stats``
names.

Image sets (``read_images``) are data sets (``cmt_core.data.datasets.Dataset``) of float32 ``(C, H, W)`` images in
[-1, 1], read a batch at a time, so 50,000 images are never in memory as floats:

* a folder of PNG (or JPEG) files, searched recursively and sorted by relative path (EDM's ``generate.py`` writes
  ``<out>/000000/000000.png``, ``<out>/001000/001000.png``, ...), grey or RGB, all of one size, or a ``.zip`` of
  them as EDM's dataset_tool writes it (``cmt_core.data.images.ImageFolderDataset``: headers are read at once,
  pixels when a batch is read);
* an ``.npz`` whose ``arr_0`` is uint8 ``(N, H, W, C)`` with C = 1 or 3 (the ADM evaluator's format, in which EDM2
  and ADM write sample batches; ``NpzImages``): rows are streamed from the archive member, never read whole.

A uint8 pixel u becomes ``u / 127.5 - 1`` (``cmt_core.data.images.to_model_range``, as the data sets read images):
the centre of the bin that ``cmt_core.evaluation.inception.to_uint8_rgb``'s ``x * 127.5 + 128`` truncates back to
u, so uint8 -> [-1, 1] -> uint8 is exact and Inception sees the files' own pixels.

Reference statistics (``reference_stats``) are the mean ``mu: (D,)`` and covariance ``sigma: (D, D)`` of the
features of a reference, read from

* an ``.npz`` holding ``mu`` and ``sigma`` (EDM's ``fid-refs`` files, e.g. ``cifar10-32x32.npz``, and what
  ``cmt fid --save-ref`` writes). ADM's reference batches hold such statistics beside their images: the statistics
  are read (TensorFlow's Inception computed them; ``--mode legacy_tensorflow`` reproduces it); or
* an image set as above, whose statistics are computed once and cached by ``cached_stats`` as
  ``<cache_dir>/fd_stats_<extractor's cache_key>_ref<N>_<digest>.npz`` (``cache_dir``: the artifact root's
  ``features`` folder). The digest is a sha1 of the files' contents: the relative names, sizes and bytes of a
  folder's images, or the bytes of an ``.npz`` / ``.zip`` (modification times play no part: any changed byte
  misses the cache, a copy of the files elsewhere hits it). It reads every file once, far faster than computing
  features.

``open_reference`` checks a reference against what the extractor compares samples of a shape with, reading no pixels
and computing nothing: statistics of the extractor's feature dimension, finite; at least 2 images, of the samples'
shape unless the extractor compares images of any size (Inception's, which resizes every image to 299 x 299).
Every problem with a file is an ``InputFileError`` naming the field (``SAMPLES``, ``--ref``,
``eval.reference_stats``) and the file on one line.
"""

from __future__ import annotations

import hashlib
import math
import os
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from cmt_core.data.datasets import Dataset
from cmt_core.data.images import ImageFolderDataset, to_model_range
from cmt_core.errors import InputFileError, brief, describe, first_line
from cmt_core.evaluation.features import FeatureExtractor, extract_features
from cmt_core.evaluation.frechet import Stats, cached_stats, stats_file

IMAGES_ARRAY = "arr_0"  # the ADM evaluator's array of uint8 (N, H, W, C) images
DIGITS_SHAPE = (1, 8, 8)  # images of this shape are scored as digits offline (FD-digits)
NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _where(field: str, path) -> str:
    return f"{field}={brief(str(path))}"


def _npy_header(archive: zipfile.ZipFile, name: str, where: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, offset of the data in the member)`` of the array ``name`` of an open ``.npz``,
    from its header alone: a huge array claimed is refused before anything is allocated."""
    with archive.open(f"{name}.npy") as member:
        version = np.lib.format.read_magic(member)
        if version not in NPY_HEADERS:
            raise InputFileError(f"{where}: its {name} is a .npy of version {version}, which is not read (1.0 or 2.0)")
        shape, fortran_order, dtype = NPY_HEADERS[version](member)
        return shape, fortran_order, dtype, member.tell()


class NpzImages(Dataset):
    """The uint8 images ``arr_0: (N, H, W, C)`` (C = 1 or 3) of an ``.npz`` as float32 ``(C, H, W)`` in [-1, 1].

    Opening reads the array's header only; ``read`` reads the rows it is asked for from the archive member, kept open
    (once per process): in order, as ``batches`` reads them, a compressed member is decompressed once."""

    def __init__(self, path: Path, field: str):
        self.path, self.where = path, _where(field, path)
        self._member, self._pid = None, None
        with zipfile.ZipFile(path) as archive:
            shape, fortran_order, dtype, self._offset = _npy_header(archive, IMAGES_ARRAY, self.where)
        if dtype != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3) or fortran_order:
            raise InputFileError(f"{self.where}: {IMAGES_ARRAY} must be uint8 images (N, H, W, C) with C = 1 or 3 in "
                                 f"C order, got {dtype} {shape}{' in Fortran order' if fortran_order else ''}")
        n, h, w, c = shape
        self.num_images, self.sample_shape = n, (c, h, w)
        self._row_bytes = h * w * c

    def __len__(self) -> int:
        return self.num_images

    def _open_member(self):
        """The archive member, opened once per process (a forked process must not share its parent's offset)."""
        if self._pid != os.getpid():
            self._member, self._pid = zipfile.ZipFile(self.path).open(f"{IMAGES_ARRAY}.npy"), os.getpid()
        return self._member

    def _read(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` (int64 ``(n,)``): the span from the first to the last is read, then ``idx`` taken from it."""
        if not len(idx):
            return torch.empty(0, *self.sample_shape)
        lo, hi = int(idx.min()), int(idx.max()) + 1
        member = self._open_member()
        member.seek(self._offset + lo * self._row_bytes)
        data = member.read((hi - lo) * self._row_bytes)
        if len(data) != (hi - lo) * self._row_bytes:
            raise InputFileError(f"{self.where}: its {IMAGES_ARRAY} is truncated: {len(self)} images announced, "
                                 f"images {lo}..{hi - 1} cannot all be read")
        rows = np.frombuffer(data, np.uint8).reshape(hi - lo, *self.sample_shape[1:], self.sample_shape[0])
        return to_model_range(rows[(idx - lo).numpy()].transpose(0, 3, 1, 2), 255.0)


def _npz_arrays(path: Path, where: str) -> set[str]:
    """The names of the arrays of the ``.npz`` at ``path``; ``InputFileError`` for a file that is no zip archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            return {name.removesuffix(".npy") for name in archive.namelist()}
    except (zipfile.BadZipFile, OSError) as err:
        raise InputFileError(f"{where} is not an .npz (zip) archive, or a damaged one: {describe(err)}") from err


def read_images(path: str | Path, field: str) -> Dataset:
    """The image set at ``path`` (module docstring): a folder or ``.zip`` of images, or an ``.npz`` whose ``arr_0``
    holds them; ``InputFileError`` naming ``field`` and the file when it is none of these or holds no images."""
    path, where = Path(path), _where(field, path)
    if not path.exists():
        raise InputFileError(f"{where} does not exist")
    if path.is_dir() or path.suffix.lower() == ".zip":
        try:
            return ImageFolderDataset(path, None)
        except Exception as err:  # no images, sizes that differ, a header PIL refuses
            # the data set's advice to set data.resolution is for training data, not for an image set scored here
            raise InputFileError(f"{where} cannot be read as images: "
                                 f"{first_line(err).removesuffix('; set data.resolution')}") from err
    arrays = _npz_arrays(path, where)
    if IMAGES_ARRAY not in arrays:
        holds = "statistics (mu, sigma)" if {"mu", "sigma"} <= arrays else f"the arrays {sorted(arrays)}"
        raise InputFileError(f"{where} holds {holds}, not images: an .npz of images holds {IMAGES_ARRAY}, uint8 "
                             "(N, H, W, C)")
    try:
        images = NpzImages(path, field)
    except InputFileError:
        raise
    except Exception as err:  # a damaged member or header
        raise InputFileError(f"{where}: its {IMAGES_ARRAY} cannot be read: {describe(err)}") from err
    if not len(images):
        raise InputFileError(f"{where}: its {IMAGES_ARRAY} holds no images")
    return images


def read_stats(path: Path, field: str, dim: int, extractor_name: str) -> Stats:
    """``(mu, sigma)`` of a statistics ``.npz`` as stored (as ``cached_stats`` reads its own files), checked: ``mu``
    ``(D,)``, ``sigma`` ``(D, D)``, floating-point, finite, and ``D == dim`` (the features of ``extractor_name``);
    ``InputFileError`` naming ``field``, the file and what is wrong."""
    where = _where(field, path)
    try:
        with zipfile.ZipFile(path) as archive:
            if "sigma.npy" not in archive.namelist():
                raise InputFileError(f"{where} holds mu but no sigma: statistics are mu (D,) and sigma (D, D)")
            (mu_shape, _, mu_dtype, _), (sigma_shape, _, sigma_dtype, _) = (
                _npy_header(archive, name, where) for name in ("mu", "sigma"))
    except InputFileError:
        raise
    except Exception as err:  # a damaged member or header
        raise InputFileError(f"{where}: its statistics cannot be read: {describe(err)}") from err
    if mu_dtype.kind != "f" or sigma_dtype.kind != "f":
        raise InputFileError(f"{where}: mu and sigma must be floating-point, got {mu_dtype} and {sigma_dtype}")
    if len(mu_shape) != 1:
        raise InputFileError(f"{where}: mu has shape {mu_shape}, not (D,)")
    d = mu_shape[0]
    if sigma_shape != (d, d):
        raise InputFileError(f"{where}: sigma has shape {sigma_shape}, not ({d}, {d}) as mu of {d} dimensions needs")
    if d != dim:
        raise InputFileError(f"{where} holds statistics of {d}-dimensional features, but {extractor_name} features "
                             f"have {dim} dimensions")
    try:
        with np.load(path, allow_pickle=False) as f:
            mu, sigma = f["mu"], f["sigma"]
    except Exception as err:  # a damaged member
        raise InputFileError(f"{where}: its statistics cannot be read: {describe(err)}") from err
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise InputFileError(f"{where}: mu or sigma holds inf or NaN")
    return mu, sigma


def extractor_label(extractor) -> str:
    """The name of an extractor, or of its class before one is built (Inception's name depends on its mode)."""
    return getattr(extractor, "name", "Inception")


def open_reference(path: str | Path, field: str, extractor, sample_shape: tuple[int, ...]) -> Stats | Dataset:
    """The reference at ``path``: statistics (an ``.npz`` holding ``mu``) or an image set, checked against what
    ``extractor`` (an extractor, or its class: ``features.extractor_kind``) compares samples ``(C, H, W) =
    sample_shape`` with (module docstring), without reading pixels or computing features."""
    path, where = Path(path), _where(field, path)
    if path.is_file() and path.suffix.lower() != ".zip" and "mu" in _npz_arrays(path, where):
        return read_stats(path, field, extractor.feature_dim(tuple(sample_shape)), extractor_label(extractor))
    images = read_images(path, field)
    if len(images) < 2:
        raise InputFileError(f"{where} holds 1 image: statistics need at least 2")
    if not extractor.any_size and tuple(images.sample_shape) != tuple(sample_shape):
        raise InputFileError(f"{where} holds images of shape {tuple(images.sample_shape)}, the samples are "
                             f"{tuple(sample_shape)}: {extractor_label(extractor)} compares images of one shape "
                             "(Inception weights compare any sizes)")
    return images


def _batches(images: Dataset, batch_size: int, where: str):
    """``images.batches(batch_size)``, where any failure to read or decode a batch is an ``InputFileError``."""
    batches = images.batches(batch_size)
    while True:
        try:
            batch = next(batches, None)
        except InputFileError:
            raise
        except Exception as err:  # a truncated PNG, a damaged archive member: the files' fault
            raise InputFileError(f"{where} cannot be read: {describe(err)}") from err
        if batch is None:
            return
        yield batch


def image_features(images: Dataset, extractor: FeatureExtractor, batch_size: int, field: str,
                   path: str | Path) -> np.ndarray:
    """Features ``(len(images), D)`` of an image set read ``batch_size`` at a time, with a progress bar when there
    is more than one batch; a file that cannot be decoded is an ``InputFileError`` naming ``field`` and ``path``."""
    bar = tqdm(_batches(images, batch_size, _where(field, path)), total=math.ceil(len(images) / batch_size),
               desc=f"{extractor.name} features of {Path(path).name}", unit="batch", leave=False,
               disable=len(images) <= batch_size, dynamic_ncols=True)
    return extract_features(extractor, bar, batch_size)


def files_digest(path: Path, images: Dataset) -> str:
    """sha1 (12 hex digits) of an image set's files (module docstring): a folder's image names, sizes and bytes, in
    ``images``' order; a single file's bytes."""
    digest = hashlib.sha1()
    files = [(name, path / name) for name in images.names] if path.is_dir() else [("", path)]
    for name, file in files:
        digest.update(f"{name}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha1").digest())
    return digest.hexdigest()[:12]


class Reference(NamedTuple):
    """Reference statistics, what they were read from (``"mu/sigma statistics"`` or ``"<N> images"``) and, for
    images, the file they are cached in."""

    stats: Stats
    source: str
    cache: Path | None


def reference_stats(path: str | Path, field: str, extractor: FeatureExtractor, sample_shape: tuple[int, ...],
                    cache_dir: str | Path, batch_size: int) -> Reference:
    """The statistics of the reference at ``path`` in ``extractor``'s feature space, for samples ``(C, H, W) =
    sample_shape`` (``open_reference``'s checks); those of images are computed on the first call and cached in
    ``cache_dir`` (module docstring)."""
    reference = open_reference(path, field, extractor, sample_shape)
    if isinstance(reference, tuple):
        return Reference(reference, "mu/sigma statistics", None)
    key = f"{extractor.cache_key}_ref{len(reference)}_{files_digest(Path(path), reference)}"
    stats = cached_stats(cache_dir, key, lambda: image_features(reference, extractor, batch_size, field, path))
    return Reference(stats, f"{len(reference)} images", stats_file(cache_dir, key))


def data_name(sample_shape: tuple[int, ...]) -> str:
    """The data an image set of ``sample_shape`` is scored as without Inception weights (``features.extractor_kind``):
    ``digits`` for 8x8 grey images (FD-digits), any other image data (FD-pixels) otherwise."""
    return "digits" if tuple(sample_shape) == DIGITS_SHAPE else "image_folder"
