"""Encoded data sets: images encoded once into a latent encoder's posterior moments, kept in a zarr store, and
drawn from at every training step (EDM2's ``dataset_tool.py encode`` and its training loop's
``encoder.encode_latents``).

Layout of the group at ``path`` (``latents.zarr`` in the ``encode`` stage's artifact)::

    moments     (N, 2C, h, w) float32   posterior mean and std concatenated along channels (``StabilityVAE.moments``),
                                        image k of the source data set at row k; chunks of ``chunk_images``,
                                        ``shard_chunks`` chunks per shard file
    labels      (N,) int64              each image's class (absent for unlabelled data), sharded as ``moments``
    shard_done  (num_shards,) uint8     1 once a shard is written (one chunk per shard)
    zarr.json   attributes: ``format``, ``num_images``, ``model_shape`` (C, h, w), the encoder's ``describe()``, the
                source's description, versions, and ``complete``, written last.

Every chunk is zstd-compressed and crc32c-checksummed (a corrupted chunk raises on read). A shard is the unit of
writing: each worker owns whole shards (zarr 3 has no synchronizers).

``encode_dataset(moments_of, path, num, ...)`` fills the store shard by shard, on a dask cluster
(``cmt_core.cluster``) or in this process. ``moments_of`` is a picklable zero-argument factory, built once per
worker, of ``fn(start, stop) -> (moments (n, 2C, h, w), labels (n,) or None)``: ``PixelMoments`` encodes images
of a data set with an encoder; ``EDM2Latents`` reads EDM2's own encoded layout. A shard is always computed in the
same batches, so the store is bit-identical for any number of workers (on one device type, with one torch thread per
task as dask workers run them: a convolution's rounding depends on the thread count); a rerun computes only the
shards without a done marker (a killed worker's shard is recomputed whole).

Reading: ``EncodedDataset`` gives rows of moments by index (a ``Dataset`` of ``(2C, h, w)`` samples);
``LatentSource`` is the training batch source: the batch's images in an ``EpochSampler`` order, one fresh
posterior draw per image per step from the stream ``LATENT_DRAW`` keyed by (seed, step) (drawn for the global
batch, each rank keeping its slice), whitened by the encoder (``encoder.latents``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import time
import uuid
import zipfile
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm
from zarr.codecs import Crc32cCodec, ZstdCodec

from cmt_core import conditioning
from cmt_core.artifacts import package_versions
from cmt_core.cluster import dask_available, run_shards
from cmt_core.data.datasets import Dataset
from cmt_core.data.sources import EpochSampler, rank_slice
from cmt_core.rng import Stream, generator

log = logging.getLogger("cmt")

FORMAT = "cmt-latents/1"


class LatentStoreError(ValueError):
    """The latent store is absent, incomplete or not one this version reads; the message names it."""


# ------------------------------------------------------------------------------------------------ the store


def create_latent_store(path: Path, num: int, model_shape: tuple[int, int, int], labelled: bool,
                        chunk_images: int, shard_chunks: int, attrs: dict) -> None:
    """An empty store at the folder ``path`` for ``num`` images whose latents have ``model_shape`` ``(C, h, w)``
    (moments: ``2C`` channels), built in a temporary folder and renamed into place."""
    path = Path(path)
    c, h, w = (int(s) for s in model_shape)
    shard = chunk_images * shard_chunks
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(tmp, mode="w")
    codecs = [ZstdCodec(level=3), Crc32cCodec()]
    group.create_array("moments", shape=(num, 2 * c, h, w), dtype="float32", chunks=(chunk_images, 2 * c, h, w),
                       shards=(shard, 2 * c, h, w), compressors=codecs, fill_value=np.nan,
                       dimension_names=("image", "channel", "y", "x"))
    if labelled:
        group.create_array("labels", shape=(num,), dtype="int64", chunks=(shard,), compressors=codecs, fill_value=-1)
    group.create_array("shard_done", shape=(-(-num // shard),), dtype="uint8", chunks=(1,), fill_value=0,
                       compressors=None)
    group.update_attributes({**attrs, "format": FORMAT, "num_images": num, "model_shape": [c, h, w],
                             "labelled": labelled, "chunk_images": chunk_images, "shard_chunks": shard_chunks,
                             "versions": package_versions(("cmt", "torch", "zarr", "numpy")),
                             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "complete": False})
    tmp.rename(path)


class LatentStore:
    """An opened latent store (module docstring); ``moments`` and ``labels`` are its zarr arrays."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise LatentStoreError(f"{self.path} is no latent store (no zarr.json)")
        self.group = zarr.open_group(self.path, mode="r+")
        self.attrs = dict(self.group.attrs)
        if self.attrs.get("format") != FORMAT:
            raise LatentStoreError(f"{self.path} is not a latent store of format {FORMAT!r} "
                                   f"(format: {self.attrs.get('format')!r})")
        self.moments = self.group["moments"]
        self.labels = self.group["labels"] if self.attrs["labelled"] else None

    def __len__(self) -> int:
        return int(self.attrs["num_images"])

    @property
    def model_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.attrs["model_shape"])

    @property
    def shard_images(self) -> int:
        return int(self.attrs["chunk_images"]) * int(self.attrs["shard_chunks"])

    @property
    def num_shards(self) -> int:
        return -(-len(self) // self.shard_images)

    def shard_range(self, k: int) -> tuple[int, int]:
        return k * self.shard_images, min((k + 1) * self.shard_images, len(self))

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    def missing_shards(self) -> list[int]:
        return np.flatnonzero(self.group["shard_done"][:] == 0).tolist()

    def write_shard(self, k: int, moments: torch.Tensor, labels: torch.Tensor | None) -> None:
        """Write shard ``k`` whole (its moments, finite, and its labels), then mark it done."""
        start, stop = self.shard_range(k)
        expected = (stop - start, *self.moments.shape[1:])
        if tuple(moments.shape) != expected:
            raise ValueError(f"shard {k} needs moments of shape {expected}, got {tuple(moments.shape)}")
        if not torch.isfinite(moments).all():
            raise ValueError(f"shard {k}: the encoder returned non-finite moments; nothing of the shard was written")
        if (labels is None) != (self.labels is None):
            raise ValueError(f"shard {k}: the store is {'' if self.labels is not None else 'un'}labelled, the "
                             f"source {'gave no' if labels is None else 'gave'} labels")
        self.moments.with_config({"write_empty_chunks": True})[start:stop] = moments.float().cpu().numpy()
        if labels is not None:
            self.labels[start:stop] = labels.long().cpu().numpy()
        self.group["shard_done"][k] = 1

    def mark_complete(self, **extra) -> None:
        missing = self.missing_shards()
        if missing:
            raise LatentStoreError(f"{self.path}: {len(missing)} of {self.num_shards} shards are missing")
        self.group.update_attributes({**extra, "complete": True, "completed": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def open_latents(path: Path) -> LatentStore:
    """The complete latent store at ``path`` (``LatentStoreError`` for an absent or incomplete one)."""
    store = LatentStore(path)
    if not store.complete:
        raise LatentStoreError(f"{path} is an incomplete latent store ({len(store.missing_shards())} of "
                               f"{store.num_shards} shards missing): rerun the encode stage")
    return store


# ------------------------------------------------------------------------------------------ what is encoded


class PixelMoments:
    """``moments_of`` for images: the factory (picklable) builds ``images()`` (a ``Dataset`` of images in
    [-1, 1]) and ``encoder()`` (with ``moments``) once, and encodes images ``[start, stop)`` ``batch`` at a time."""

    def __init__(self, images: Callable, encoder: Callable, batch: int):
        self.images, self.encoder, self.batch = images, encoder, batch

    def __call__(self):
        images, encoder = self.images(), self.encoder()

        def fn(start: int, stop: int):
            parts = [encoder.moments(images.read(slice(b, min(b + self.batch, stop))))
                     for b in range(start, stop, self.batch)]
            labels = images.labels(slice(start, stop)) if images.num_classes else None
            return torch.cat(parts), labels

        return fn


class EDM2Latents(Dataset):
    """EDM2's encoded data set (``dataset_tool.py encode``): a folder or zip of ``*.npy`` files, each one image's
    float32 moments ``(2C, h, w)``, in sorted file order, and ``dataset.json``'s ``labels`` (``[[file, class],
    ...]`` or null). ``.npy`` files are read with ``allow_pickle=False``. Rows are moments, not latents."""

    def __init__(self, path: Path, num_classes: int = 0):
        self.path = Path(path)
        self._zip = zipfile.ZipFile(self.path) if self.path.is_file() else None
        names = self._zip.namelist() if self._zip else [p.relative_to(self.path).as_posix()
                                                        for p in self.path.rglob("*") if p.is_file()]
        self.files = sorted(n for n in names if n.endswith(".npy"))
        if not self.files:
            raise LatentStoreError(f"{self.path} holds no .npy files: not an EDM2 encoded data set")
        self.sample_shape = tuple(self._load(0).shape)
        self.num_classes = num_classes
        if num_classes:
            meta = json.loads(self._bytes("dataset.json")) if "dataset.json" in names else {}
            pairs = dict(meta.get("labels") or [])
            missing = [f for f in self.files if f not in pairs]
            if missing:
                raise LatentStoreError(f"{self.path}: dataset.json has no label for {missing[0]} (and "
                                       f"{len(missing) - 1} more); data.num_classes={num_classes} needs them")
            self.class_labels = torch.tensor([int(pairs[f]) for f in self.files], dtype=torch.int64)

    def _bytes(self, name: str) -> bytes:
        return self._zip.read(name) if self._zip else (self.path / name).read_bytes()

    def _load(self, k: int) -> np.ndarray:
        array = np.load(io.BytesIO(self._bytes(self.files[k])), allow_pickle=False)
        if array.ndim != 3 or array.shape[0] % 2:
            raise LatentStoreError(f"{self.path}/{self.files[k]}: moments of shape {array.shape}, expected "
                                   "(2C, h, w)")
        return array

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.from_numpy(self._load(int(k)).astype(np.float32)) for k in idx])

    def __getstate__(self):
        return {**self.__dict__, "_zip": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._zip = zipfile.ZipFile(self.path) if self.path.is_file() else None


class StoredMoments:
    """``moments_of`` for a data set whose rows already are moments (``EDM2Latents``): built by ``dataset()``."""

    def __init__(self, dataset: Callable):
        self.dataset = dataset

    def __call__(self):
        ds = self.dataset()
        return lambda start, stop: (ds.read(slice(start, stop)),
                                    ds.labels(slice(start, stop)) if ds.num_classes else None)


# ------------------------------------------------------------------------------------------------ encoding

_cache: dict = {}  # per worker process: the built moments function of the last factory


def _moments_fn(moments_of):
    try:
        blob = pickle.dumps(moments_of)
    except (pickle.PicklingError, AttributeError):  # a script's own functions, which dask ships by value
        import cloudpickle

        blob = cloudpickle.dumps(moments_of)
    key = hashlib.sha1(blob).hexdigest()
    if key not in _cache:
        _cache.clear()
        _cache[key] = moments_of()
    return _cache[key]


def encode_shard(moments_of, path: str, k: int, threads: int | None = 1) -> int:
    """Encode and write shard ``k`` of the store at ``path`` (the body of a dask task); returns its image count."""
    if threads is not None:
        torch.set_num_threads(threads)
    store = LatentStore(Path(path))
    start, stop = store.shard_range(k)
    with torch.no_grad():
        moments, labels = _moments_fn(moments_of)(start, stop)
    store.write_shard(k, moments, labels)
    return stop - start


def _encode_task(k: int, moments_of, path: str) -> int:
    return encode_shard(moments_of, path, k)


def encode_dataset(moments_of, path: Path, num: int, model_shape: tuple[int, int, int], labelled: bool,
                   cfg, attrs: dict, progress: Callable[[int, int], None] | None = None,
                   in_process: bool = False) -> Path:
    """Fill (or finish) the latent store at ``path`` with the moments of ``num`` images (``moments_of``: module
    docstring); ``cfg``: an ``EncodeConfig`` (store chunking and the cluster); ``attrs``: what decides the stored
    bits (encoder, source), which a resumed store must match. ``progress(done, total)`` after every shard."""
    path = Path(path)
    if (path / "zarr.json").is_file():
        found = LatentStore(path).attrs
        diff = {k: (found.get(k), v) for k, v in attrs.items() if found.get(k) != v}
        if diff:
            raise LatentStoreError(f"{path} holds other latents; differing fields (stored, requested): {diff}")
        if found.get("complete"):
            return path
    else:
        create_latent_store(path, num, model_shape, labelled, cfg.chunk_images, cfg.shard_chunks, attrs)
    store = LatentStore(path)
    todo = store.missing_shards()
    on_dask = not in_process and dask_available()
    t0 = time.perf_counter()
    with tqdm(total=len(store), initial=len(store) - sum(-np.subtract(*store.shard_range(k)) for k in todo),
              desc="encode", unit="img", dynamic_ncols=True) as bar:
        def advance(n: int) -> None:
            bar.update(n)
            if progress is not None:
                progress(int(bar.n), len(store))

        advance(0)
        if on_dask and todo:
            run_shards(cfg.cluster, _encode_task, todo, "encode", advance, moments_of=moments_of, path=str(path))
        else:
            for k in todo:
                advance(encode_shard(moments_of, str(path), k, threads=None))
    runs = [*store.attrs.get("encode_runs", []),
            {"shards_computed": len(todo), "shards_total": store.num_shards, "seconds": time.perf_counter() - t0,
             "cluster": (cfg.cluster.address or f"LocalCluster({cfg.cluster.workers} workers)") if on_dask
             else "in process"}]
    store.mark_complete(encode_runs=runs)
    return path


# ------------------------------------------------------------------------------------------------- reading


class EncodedDataset(Dataset):
    """Rows of a complete latent store: moments ``(2C, h, w)`` float32 by index (and labels when it has them and
    ``num_classes`` > 0). A subset is the train / held-out split of the source's indices."""

    def __init__(self, path: Path, num_classes: int = 0):
        self.store = open_latents(path)
        c, h, w = self.store.model_shape
        self.sample_shape, self.model_shape = (2 * c, h, w), (c, h, w)
        self.num_classes = num_classes if self.store.labels is not None else 0

    def __len__(self) -> int:
        return len(self.store)

    @cached_property
    def class_labels(self) -> torch.Tensor:
        return torch.from_numpy(self.store.labels[:])

    def _read(self, idx: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(idx)
        rows = torch.from_numpy(self.store.moments.get_orthogonal_selection((idx[order].numpy(),)))
        out = torch.empty_like(rows)
        out[order] = rows
        return out


class LatentSource:
    """Training batches of latents: ``{"x": (B, C, h, w), "cond"}`` (module docstring). ``moments``: a ``Dataset``
    of moments (an ``EncodedDataset`` or its split); ``encoder``: whitens a draw (``latents(moments, noise)``)."""

    def __init__(self, moments: Dataset, encoder, seed: int = 0, labels: bool = False):
        if labels and not moments.num_classes:
            raise ValueError("labels were asked for, but the encoded data set has no class labels")
        self.moments, self.encoder, self.seed, self.labels = moments, encoder, seed, labels
        self.sampler = EpochSampler(len(moments), seed)
        self.channels = moments.sample_shape[0] // 2

    def batch(self, step, batch_size, rank=0, world=1):
        rows = rank_slice(batch_size, rank, world)
        idx = self.sampler.indices(step, batch_size)[rows]
        noise = torch.randn(batch_size, self.channels, *self.moments.sample_shape[1:],
                            generator=generator(Stream.LATENT_DRAW, self.seed, step))[rows]
        x = self.encoder.latents(self.moments.read(idx), noise)
        labels = self.moments.labels(idx) if self.labels else None
        return {"x": x, "cond": conditioning.class_cond(labels, self.moments.num_classes)}


class WhitenedMeans:
    """The classifier data of ELatentLPIPS's latent VGG16 (``cmt_core.objectives.latent_lpips.train_latent_vgg``):
    item i is ``(the whitened posterior mean of row i (C, h, w), its class)``, a torch-style map data set over
    ``moments`` (a labelled ``Dataset`` of moments) and ``encoder``. The reference draws a fresh posterior sample
    per step; the mean keeps the items a function of their index (our choice)."""

    def __init__(self, moments: Dataset, encoder):
        if not moments.num_classes:
            raise ValueError("the latent VGG16 is trained as a classifier: the data needs classes (data.num_classes)")
        self.moments, self.encoder = moments, encoder

    def __len__(self) -> int:
        return len(self.moments)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = self.moments.read([i])
        mean = self.encoder.latents(row, torch.zeros(1, row.shape[1] // 2, *row.shape[2:]))[0]
        return mean, int(self.moments.labels([i])[0])
