"""The trajectory store: one zarr v3 group per rollout artifact.

Layout of the group at ``path``::

    states      (N, K, *sample_shape)  K = T + 1 solver states, or len(keep_indices); index 0 = noise end
    cond/<name> (N, *shape)            each trajectory's conditioning (``cmt_core.conditioning``, e.g.
                                       ``class_labels`` (N, C) float32), chunked and sharded with ``states``;
                                       absent for an unconditional store (attribute ``cond``: name -> shape)
    grid        (K,) float64           noise levels of the kept states (decreasing)
    seeds       (N,) int64             seed of each trajectory's noise (``rollout.trajectory_seed``)
    shard_done  (num_shards,) uint8    1 once a shard's states are written (one chunk per shard)
    zarr.json   attributes: provenance (teacher id, solver, grid, seed, dtype, versions, creation time)
                and ``complete``, written last, after every shard is marked done.

``path`` is a local folder or a URL on object storage (``s3://bucket/.../store.zarr``, through zarr's
``FsspecStore``: the same layout, one object per file; ``cmt_core.object_storage``).

A chunk of ``states`` holds whole trajectories (all K states) of ``chunk_trajectories`` samples, so a
training pair (x_{t_i}, x_{t_j}) never needs two chunks; ``shard_chunks`` chunks form one shard file.
Zarr 3 has no synchronizers: a shard is the unit of writing, and every writer owns whole shards (``write_shard``).
Every chunk goes through the store's compressor (zstd, blosc-zstd with byte shuffle, or none) followed by a crc32c
checksum, so a corrupted chunk raises on read instead of returning noise; a chunk that is absent reads as NaN (the
fill value), which ``verify_store`` (``cmt_core.trajectories.verify``) also reports.

Storage dtypes: float32 (exact), float16, bfloat16. Zarr has no bfloat16 data type, so bfloat16 states are
stored as their raw bits in a uint16 array (attribute ``states_encoding = "bfloat16-bits"``) and converted
back on read; every read returns float32.

Sizes (uncompressed ``states``; ``layout.sizing`` computes them; float noise compresses by a few percent at most):

==========================================  =========  ===========  ==========  ==========
run                                          states     float32      16-bit      per traj (fp32)
==========================================  =========  ===========  ==========  ==========
CIFAR-10, 2.4M traj, 3x32x32                 all 17     501.4 GB     250.7 GB    208,896 B
CIFAR-10, keep_indices 0, 2, ..., 16          9         265.4 GB     132.7 GB    110,592 B
ImageNet-512 latents, 1.28M traj, 4x64x64    all 17     1426.1 GB    713.0 GB    1,114,112 B
ImageNet-512 latents, keep 0, 2, ..., 16      9         755.0 GB     377.5 GB    589,824 B
==========================================  =========  ===========  ==========  ==========

(GB = 1e9 bytes; 16-bit = float16 or bfloat16.)
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
import uuid
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.experimental.cache_store import CacheStore
from zarr.storage import FsspecStore, MemoryStore, WrapperStore

from cmt_core.artifacts import package_versions
from cmt_core.errors import describe
from cmt_core.object_storage import filesystem, is_url, location, sizes
from cmt_core.trajectories.layout import FORMAT, StoreMetadataError, check_layout

BFLOAT16_BITS = "bfloat16-bits"  # states_encoding of a bfloat16 store: raw uint16 bits, view as torch.bfloat16
_BF16_NAN_BITS = 0x7FC0
REMOTE_CACHE_BYTES = 2 << 30  # memory for the byte ranges read from a store at a URL (``open_store``)
# below this mean chunk size, a store read by byte ranges pays more for its requests than for its bytes (an S3 GET
# costs its client a few ms of CPU: ``benchmarks/object_storage.py``'s ``request_ms``)
SMALL_RANGE_BYTES = 1 << 20

log = logging.getLogger("cmt")



class IncompleteStoreError(RuntimeError):
    """The store's ``complete`` flag is not set: its rollouts are still running or were interrupted."""


class CorruptChunkError(RuntimeError):
    """A chunk failed its checksum or could not be decoded."""


class NonFiniteStatesError(ValueError):
    """Trajectories handed to ``write_shard`` hold inf or NaN: the store refuses them."""


# ---------------------------------------------------------------------------------------------- layout
class TrajectoryStore:
    """An opened store. ``states`` is the zarr array in its storage dtype; ``read`` returns float32.

    ``grid`` ``(K,)`` float64; ``seeds`` ``(N,)`` int64 (None when the producer gave none) is read on first use.
    """

    def __init__(self, path: Path | str, group: zarr.Group, attrs: dict):
        self.path, self.group, self.attrs = path, group, attrs
        self.states = group["states"]
        self.grid = torch.from_numpy(group["grid"][:])

    def __repr__(self) -> str:
        return f"TrajectoryStore({str(self.path)!r}, states={self.states.shape}, complete={self.complete})"

    @cached_property
    def seeds(self) -> torch.Tensor | None:
        return torch.from_numpy(self.group["seeds"][:]) if "seeds" in self.group else None

    def __len__(self) -> int:
        return self.states.shape[0]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.states.shape[2:])

    @property
    def chunk_trajectories(self) -> int:
        return int(self.attrs["chunk_trajectories"])

    @property
    def shard_trajectories(self) -> int:
        return int(self.attrs["chunk_trajectories"]) * int(self.attrs["shard_chunks"])

    @property
    def num_chunks(self) -> int:
        return -(-len(self) // self.chunk_trajectories)

    @property
    def num_shards(self) -> int:
        return -(-len(self) // self.shard_trajectories)

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete", False))

    @property
    def cond_names(self) -> tuple[str, ...]:
        """The conditioning entries each trajectory carries (empty: an unconditional store)."""
        return tuple(self.attrs.get("cond") or {})

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        """Trajectories ``[start, stop)`` of chunk ``chunk``."""
        start = chunk * self.chunk_trajectories
        return start, min(start + self.chunk_trajectories, len(self))

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Trajectories ``[start, stop)`` of shard ``shard`` (the last shard may be partial)."""
        start = shard * self.shard_trajectories
        return start, min(start + self.shard_trajectories, len(self))

    def shard_of_chunk(self, chunk: int) -> int:
        return chunk // int(self.attrs["shard_chunks"])

    def read_chunk(self, chunk: int) -> torch.Tensor:
        """States ``(chunk size, K, *sample_shape)`` float32 of one chunk; raises ``CorruptChunkError``."""
        start, stop = self.chunk_range(chunk)
        try:
            raw = self.states[start:stop]
        except Exception as err:  # checksum mismatch (ValueError), zstd / blosc errors (RuntimeError), ...
            raise CorruptChunkError(
                f"{self.path}: chunk {chunk} (trajectories {start}..{stop - 1}, shard {self.shard_of_chunk(chunk)}) "
                f"cannot be read: {err}. Run `cmt store verify {self.path}`; `reset_shards` and a rollout rerun "
                f"rewrite bad shards.") from err
        return decode_states(raw, self.attrs["dtype"])

    def read_cond_chunk(self, chunk: int) -> dict[str, torch.Tensor]:
        """The conditioning ``{name: (chunk size, ...)}`` float32 of one chunk's trajectories (``{}`` when
        unconditional); raises ``CorruptChunkError``."""
        start, stop = self.chunk_range(chunk)
        out = {}
        for name in self.cond_names:
            try:
                out[name] = torch.from_numpy(np.ascontiguousarray(self.group[f"cond/{name}"][start:stop]))
            except Exception as err:  # checksum mismatch, codec errors
                raise CorruptChunkError(f"{self.path}: cond {name!r} of chunk {chunk} (shard "
                                        f"{self.shard_of_chunk(chunk)}) cannot be read: {err}") from err
        return out

    def read(self, indices) -> torch.Tensor:
        """States ``(len(indices), K, *sample_shape)`` float32 of the trajectories ``indices`` (any order)."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"trajectory indices must lie in [0, {len(self)}), got {idx.min()}..{idx.max()}")
        out = torch.empty(len(idx), *self.states.shape[1:], dtype=torch.float32)
        chunks = idx // self.chunk_trajectories
        for chunk in chunks.unique().tolist():
            rows = (chunks == chunk).nonzero().flatten()
            out[rows] = self.read_chunk(chunk)[idx[rows] - chunk * self.chunk_trajectories]
        return out

    def read_cond(self, indices) -> dict[str, torch.Tensor]:
        """The conditioning ``{name: (len(indices), ...)}`` of the trajectories ``indices`` (``{}``: unconditional)."""
        if not self.cond_names:
            return {}
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        chunks = idx // self.chunk_trajectories
        parts = {c: self.read_cond_chunk(c) for c in chunks.unique().tolist()}
        return {name: torch.stack([parts[int(c)][name][int(i) - int(c) * self.chunk_trajectories]
                                   for c, i in zip(chunks, idx)]) for name in self.cond_names}


def encode_states(states: torch.Tensor, dtype: str) -> np.ndarray:
    """float states -> the numpy array stored for ``dtype`` (bfloat16: its uint16 bits)."""
    if dtype == "bfloat16":
        return states.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return states.to(getattr(torch, dtype)).numpy()


def decode_states(raw: np.ndarray, dtype: str) -> torch.Tensor:
    """The stored numpy array -> float32 tensor."""
    raw = np.ascontiguousarray(raw)
    if dtype == "bfloat16":
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(raw).float()


def _compressors(cfg) -> list:
    codecs = {"zstd": [ZstdCodec(level=cfg.level)],
              "blosc": [BloscCodec(cname="zstd", clevel=min(cfg.level, 9), shuffle="shuffle")],
              "none": []}[cfg.codec]
    return codecs + [Crc32cCodec()]


# --------------------------------------------------------------------------------------------- writing
def create_store(path, num: int, sample_shape, grid: torch.Tensor, cfg, attrs: dict | None = None,
                 seeds: torch.Tensor | None = None, cond_shapes: dict[str, tuple[int, ...]] | None = None
                 ) -> TrajectoryStore:
    """Create an empty store for ``num`` trajectories; returns it opened for writing.

    ``cfg``: the layout (a ``StoreConfig``: dtype, codec, level, chunk_trajectories, shard_chunks, keep_indices).
    ``grid`` is the solver's full grid ``(T + 1,)``; the store keeps ``grid[cfg.keep_indices]``. ``attrs``
    is the caller's provenance (teacher id, solver config, seed, ...); ``seeds`` ``(num,)`` are the producer's
    per-trajectory noise seeds, stored as ``seeds``; ``cond_shapes`` names each conditioning entry a trajectory
    carries and its shape (``{"class_labels": (C,)}``; None or empty: unconditional). The group is built in a
    temporary folder and moved into place (renamed; at a URL: uploaded with the root ``zarr.json`` last, put only if
    absent), so ``path`` either does not exist or is a whole empty store.
    """
    if store_exists(path):
        raise FileExistsError(f"{path} already exists; open it with open_store(path, partial=True) to resume")
    grid = torch.as_tensor(grid, dtype=torch.float64)
    keep = list(range(len(grid))) if cfg.keep_indices is None else list(cfg.keep_indices)
    if keep != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= len(grid) or len(keep) < 2:
        raise ValueError(f"keep_indices must be >= 2 increasing indices into the {len(grid)} grid points, got {keep}")
    sample_shape = tuple(int(s) for s in sample_shape)
    kept = len(keep)
    shard_traj = cfg.chunk_trajectories * cfg.shard_chunks
    num_shards = -(-num // shard_traj)

    if is_url(path):
        tmp = Path(tempfile.mkdtemp(prefix="cmt-store-"))
    else:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    group = zarr.open_group(tmp, mode="w")
    bf16 = cfg.dtype == "bfloat16"
    group.create_array("states", shape=(num, kept, *sample_shape), dtype="uint16" if bf16 else cfg.dtype,
                       chunks=(cfg.chunk_trajectories, kept, *sample_shape), shards=(shard_traj, kept, *sample_shape),
                       compressors=_compressors(cfg), fill_value=_BF16_NAN_BITS if bf16 else np.nan,
                       dimension_names=("trajectory", "time", *[f"d{k}" for k in range(len(sample_shape))]))
    cond_shapes = {name: [int(d) for d in shape] for name, shape in (cond_shapes or {}).items()}
    for name, shape in cond_shapes.items():  # float32, sharded as the states: a shard's writer owns both
        group.create_array(f"cond/{name}", shape=(num, *shape), dtype="float32",
                           chunks=(cfg.chunk_trajectories, *shape), shards=(shard_traj, *shape),
                           compressors=_compressors(cfg), fill_value=np.nan)
    group.create_array("grid", data=grid[keep].numpy(), compressors=[Crc32cCodec()])
    if seeds is not None:
        group.create_array("seeds", data=torch.as_tensor(seeds, dtype=torch.int64).numpy(),
                           chunks=(min(shard_traj, num),), compressors=[Crc32cCodec()])
    # One uint8 chunk per shard: the writer of a shard owns its marker chunk too.
    group.create_array("shard_done", shape=(num_shards,), dtype="uint8", chunks=(1,), fill_value=0,
                       compressors=None)
    group.update_attributes({
        **(attrs or {}),
        "format": FORMAT,
        "num_trajectories": num,
        "sample_shape": list(sample_shape),
        "solver_grid": grid.tolist(),
        "grid": grid[keep].tolist(),
        "keep_indices": None if cfg.keep_indices is None else keep,
        "dtype": cfg.dtype,
        "states_encoding": BFLOAT16_BITS if bf16 else cfg.dtype,
        "codec": cfg.codec,
        "level": cfg.level,
        "checksum": "crc32c",
        "chunk_trajectories": cfg.chunk_trajectories,
        "shard_chunks": cfg.shard_chunks,
        "num_shards": num_shards,
        "cond": cond_shapes,
        "versions": package_versions(("cmt", "torch", "zarr", "numcodecs", "numpy")),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "complete": False,
    })
    try:
        _move_into_place(tmp, path)
    except OSError as err:
        raise FileExistsError(f"{path} was created concurrently; open it with open_store(path, partial=True)") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_store(path, partial=True)


def _move_into_place(tmp: Path, path) -> None:
    """Rename the built store ``tmp`` to the folder ``path``, or upload it to the URL ``path``: every file, then
    the root ``zarr.json`` (what ``store_exists`` looks for) put only if absent (``FileExistsError`` if a
    concurrent writer created it first)."""
    if not is_url(path):
        os.rename(tmp, path)
        return
    fs, root = filesystem(path)
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    for rel in files:
        if rel != "zarr.json":
            fs.put_file(str(tmp / rel), f"{root}/{rel}")
    fs.pipe_file(f"{root}/zarr.json", (tmp / "zarr.json").read_bytes(), mode="create")


def remove_store(path) -> None:
    """Delete the store at the folder or URL ``path``, root metadata first (it is no store the moment that goes)."""
    if is_url(path):
        fs, root = filesystem(path)
        fs.rm_file(f"{root}/zarr.json")
        fs.rm(root, recursive=True)
        return
    (Path(path) / "zarr.json").unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def store_exists(path) -> bool:
    """True when a store (complete or not) is at the folder or URL ``path``."""
    if is_url(path):
        fs, root = filesystem(path)
        return fs.exists(f"{root}/zarr.json")
    return (Path(path) / "zarr.json").is_file()  # a FIFO or a folder there is no store (and is never read)


def write_shard(store, shard_index: int, states: torch.Tensor, cond: dict | None = None) -> None:
    """Write shard ``shard_index`` whole (its states and its trajectories' conditioning), then mark it done.

    ``states``: ``(shard size, T + 1, *sample_shape)`` solver trajectories (the store applies its
    ``keep_indices``) or ``(shard size, K, ...)`` already reduced, every value finite in the store's dtype
    (``NonFiniteStatesError`` otherwise, before anything is written); ``cond``: ``(shard size, ...)`` per entry the
    store was created with. The caller must own the shard: two writers of one shard lose data silently in zarr 3.
    """
    store = store if isinstance(store, TrajectoryStore) else open_store(store, partial=True)
    if not 0 <= shard_index < store.num_shards:
        raise IndexError(f"shard {shard_index} out of range [0, {store.num_shards})")
    start, stop = store.shard_range(shard_index)
    keep, full = store.attrs["keep_indices"], len(store.attrs["solver_grid"])
    if keep is not None and states.shape[1] == full:
        states = states[:, keep]
    expected = (stop - start, *store.states.shape[1:])
    if tuple(states.shape) != expected:
        raise ValueError(f"shard {shard_index} needs states of shape {expected}, got {tuple(states.shape)}")
    dtype = store.attrs["dtype"]
    stored = states.to(getattr(torch, dtype))
    if not torch.isfinite(stored).all():  # a diverged ODE is never stored: nothing of the shard is written
        traj, time = (~torch.isfinite(stored.flatten(2))).any(-1).nonzero()[0].tolist()
        cause = ("the teacher's ODE diverged there" if not torch.isfinite(states[traj, time]).all() else
                 f"its values overflow the store's dtype, {dtype}")
        raise NonFiniteStatesError(f"shard {shard_index}: trajectory {start + traj} is non-finite at time index {time} "
                                   f"(sigma {float(store.grid[time]):.4g}): {cause}; nothing of the shard was written")
    cond = dict(cond or {})
    if set(cond) != set(store.cond_names):
        raise ValueError(f"shard {shard_index} needs the conditioning {sorted(store.cond_names)}, got {sorted(cond)}")
    # Every written chunk holds data: skip zarr's comparison of each chunk with the fill value.
    store.states.with_config({"write_empty_chunks": True})[start:stop] = encode_states(states, dtype)
    for name, values in cond.items():
        array = store.group[f"cond/{name}"]
        if tuple(values.shape) != (stop - start, *array.shape[1:]):
            raise ValueError(f"shard {shard_index} needs cond {name!r} of shape {(stop - start, *array.shape[1:])}, "
                             f"got {tuple(values.shape)}")
        array.with_config({"write_empty_chunks": True})[start:stop] = values.float().cpu().numpy()
    store.group["shard_done"][shard_index] = 1


def missing_shards(path) -> list[int]:
    """Shards whose states are not written yet (no done marker)."""
    store = path if isinstance(path, TrajectoryStore) else open_store(path, partial=True)
    return np.flatnonzero(store.group["shard_done"][:] == 0).tolist()


def reset_shards(path, shards) -> None:
    """Forget shards (e.g. the bad ones ``verify_store`` names) so that a rollout rerun rewrites them."""
    store = open_store(path, partial=True)
    store.group.update_attributes({"complete": False})
    marker = store.group["shard_done"]
    for shard in shards:
        marker[int(shard)] = 0


def mark_complete(path, **extra) -> None:
    """Set ``complete`` (with ``extra`` attributes) in one final write; refuses while shards are missing."""
    store = open_store(path, partial=True)
    missing = missing_shards(store)
    if missing:
        raise IncompleteStoreError(f"{path}: {len(missing)} of {store.num_shards} shards are missing "
                                   f"(first: {missing[:5]}); cannot mark the store complete")
    store.group.update_attributes({**extra, "complete": True, "completed": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


# --------------------------------------------------------------------------------------------- reading
class WholeObjectStore(WrapperStore):
    """A read-only zarr store in front of ``store`` that answers every byte-range read from the whole object,
    fetched once (one request) on its first read and kept in memory (``_objects``; bounded by the caller: used
    only for a store that fits ``open_store``'s ``cache_bytes``). A shard's index and all its chunks then cost one
    request instead of one each; concurrent first reads of an object share its one fetch.

    ``sizes`` ``{key: bytes}`` (the listing ``open_store`` made) turns each fetch into an explicit byte range
    ``[0, size)``: a plain GET of a whole object costs s3fs a HEAD request first, to learn its size."""

    def __init__(self, store, sizes: dict[str, int] | None = None):
        super().__init__(store)
        self._sizes = dict(sizes or {})
        self._objects: dict[str, object] = {}  # key -> the asyncio task fetching it, then its Buffer (or None)

    def _with_store(self, store):
        return type(self)(store, self._sizes)

    async def _whole(self, key: str, prototype):
        entry = self._objects.get(key)
        if entry is None:
            size = self._sizes.get(key)
            whole = RangeByteRequest(0, size) if size else None
            entry = self._objects[key] = asyncio.ensure_future(self._store.get(key, prototype, whole))
        if isinstance(entry, asyncio.Future):
            try:
                value = await entry
            except BaseException:
                self._objects.pop(key, None)
                raise
            self._objects[key] = value
            return value
        return entry

    async def get(self, key, prototype, byte_range=None):
        value = await self._whole(key, prototype)
        if value is None or byte_range is None:
            return value
        size = len(value)
        if isinstance(byte_range, RangeByteRequest):
            start, stop = byte_range.start, byte_range.end
        elif isinstance(byte_range, OffsetByteRequest):
            start, stop = byte_range.offset, size
        elif isinstance(byte_range, SuffixByteRequest):
            start, stop = max(size - byte_range.suffix, 0), size
        else:
            raise TypeError(f"unexpected byte range {byte_range!r}")
        return value[start:min(stop, size)]

    async def get_partial_values(self, prototype, key_ranges):
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]


def open_store(path, partial: bool = False, cache_bytes: int = REMOTE_CACHE_BYTES) -> TrajectoryStore:
    """Open the store at the folder or URL ``path``; raises ``IncompleteStoreError`` unless it is complete or
    ``partial`` (opened for writing) is asked for, and ``StoreMetadataError`` when its metadata lies
    (``cmt_core.trajectories.layout``).

    A URL is read through zarr's ``FsspecStore``; a complete one (read-only) through a cache in memory, as the page
    cache does for a local store. A store whose objects total at most ``cache_bytes`` (one listing tells) is read
    object by object (``WholeObjectStore``: a shard costs one request, its first chunk read fetches the rest with
    it); a larger one through zarr's ``CacheStore``, which keeps the byte ranges read (shard indexes, chunks),
    least recently used first out, up to ``cache_bytes``, so each shard index is fetched once."""
    path = location(path)
    if not store_exists(path):
        raise FileNotFoundError(f"no trajectory store at {path}")
    where, objects = path, {}
    if is_url(path) and not partial and cache_bytes > 0:
        remote = FsspecStore.from_url(path, read_only=True)
        objects = sizes(path)
        if sum(objects.values()) <= cache_bytes:
            where = WholeObjectStore(remote, objects)
        else:
            where = CacheStore(remote, cache_store=MemoryStore(), max_size=cache_bytes)
    try:
        group = zarr.open_group(where, mode="r+" if partial else "r")
        attrs = dict(group.attrs)
        arrays = {name: (array.shape, array.chunks) for name, array in group.arrays()}
        if "cond" in group:
            arrays.update({f"cond/{name}": (a.shape, a.chunks) for name, a in group["cond"].arrays()})
    except Exception as err:  # unreadable or malformed zarr metadata
        raise StoreMetadataError(f"{path}: its zarr metadata (zarr.json) cannot be read: {describe(err)}") from None
    check_layout(path, attrs, arrays)
    if not partial and not attrs.get("complete", False):
        done = int(np.count_nonzero(group["shard_done"][:]))
        raise IncompleteStoreError(
            f"{path} is incomplete ({done} of {attrs['num_shards']} shards written): its rollouts are running or "
            f"were interrupted. Rerun the rollouts to finish it, or open_store(path, partial=True) to inspect it.")
    store = TrajectoryStore(path, group, attrs)
    if isinstance(where, CacheStore):
        chunk = sum(size for key, size in objects.items() if key.startswith("states/c/")) / max(store.num_chunks, 1)
        if chunk < SMALL_RANGE_BYTES:
            log.warning("%s: larger than the loader's cache (%.0f MB), so read by byte ranges, a request per chunk, "
                        "and its chunks are small (%.0f KB): the requests will cost more than the bytes. Write it with "
                        "more rollout.store.chunk_trajectories, or give the loader more cache_bytes.",
                        path, cache_bytes / 1e6, chunk / 1e3)
    return store
