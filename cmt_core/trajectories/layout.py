"""The trajectory store's format on disk, its sizes, and the check that its metadata is what it claims.

A store's metadata (the root ``zarr.json`` attributes and each array's ``zarr.json``) is read from a file anyone
may have edited: ``check_layout`` treats it as untrusted. Every field the readers use is checked for its type and
range and against the others (the ``states`` array's shape and chunks, the number of shards, the grid), and the
number of chunks is bounded, so a store that lies about its sizes fails at once with one line naming the file and
the field (``StoreMetadataError``) instead of dividing by zero or looping over 10^13 chunks.
"""

from __future__ import annotations

import math

from cmt_core.errors import brief

FORMAT = "cmt-trajectory-store/1"
DTYPES = ("float32", "float16", "bfloat16")
MAX_TRAJECTORIES = 1 << 40
MAX_CHUNKS = 10**8  # ImageNet-512's 1.28M trajectories at 64 a chunk: 20,000
MAX_SAMPLE_VALUES = 1 << 28  # numbers in one sample (a 4 x 64 x 64 latent: 16,384)
MAX_SAMPLE_DIMS = 4


class StoreMetadataError(ValueError):
    """A store whose metadata is missing, of the wrong type, out of range or inconsistent; the message names the
    file and the field."""


def sizing(sample_shape, num_states: int = 17, num_trajectories: int = 1, dtype: str = "float32",
           keep_indices=None) -> dict:
    """Uncompressed size of ``states``: ``{"states", "bytes_per_trajectory", "total_bytes"}``."""
    kept = num_states if keep_indices is None else len(keep_indices)
    per = kept * math.prod(sample_shape) * (4 if dtype == "float32" else 2)
    return {"states": kept, "bytes_per_trajectory": per, "total_bytes": per * num_trajectories}


def _int(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_layout(path, attrs: dict, arrays: dict) -> None:
    """Raise ``StoreMetadataError`` unless the store at ``path`` is laid out as its attributes say.

    ``attrs``: the root group's attributes; ``arrays``: ``{name: (shape, chunk shape)}`` of its arrays, read from
    their own metadata (``states``, ``grid``, ``shard_done``, ``seeds`` when present, ``cond/<name>``)."""
    root = f"{path}/zarr.json"

    def bad(field: str, problem: str, where: str = root) -> StoreMetadataError:
        value = brief(attrs.get(field)) if where == root else ""
        return StoreMetadataError(f"{where}: {field}{'=' + value if value else ''} {problem}")

    if attrs.get("format") != FORMAT:
        raise bad("format", f"is not {FORMAT!r}: not a trajectory store")
    n, shape = attrs.get("num_trajectories"), attrs.get("sample_shape")
    if not _int(n, 1, MAX_TRAJECTORIES):
        raise bad("num_trajectories", f"must be an integer in [1, {MAX_TRAJECTORIES}]")
    if not (isinstance(shape, list) and 1 <= len(shape) <= MAX_SAMPLE_DIMS and all(_int(d, 1, MAX_SAMPLE_VALUES)
                                                                                  for d in shape)
            and math.prod(shape) <= MAX_SAMPLE_VALUES):
        raise bad("sample_shape", f"must be 1 to {MAX_SAMPLE_DIMS} positive sizes of at most {MAX_SAMPLE_VALUES} "
                                  "numbers in all")
    if attrs.get("dtype") not in DTYPES:
        raise bad("dtype", f"must be one of {DTYPES}")
    chunk, shard_chunks = attrs.get("chunk_trajectories"), attrs.get("shard_chunks")
    if not _int(chunk, 1, MAX_TRAJECTORIES):
        raise bad("chunk_trajectories", "must be a positive integer")
    if not _int(shard_chunks, 1, MAX_CHUNKS):
        raise bad("shard_chunks", f"must be an integer in [1, {MAX_CHUNKS}]")
    if -(-n // chunk) > MAX_CHUNKS:
        raise bad("chunk_trajectories", f"cuts {n} trajectories into more than {MAX_CHUNKS} chunks")
    shards = -(-n // (chunk * shard_chunks))
    if attrs.get("num_shards") != shards:
        raise bad("num_shards", f"must be {shards} for {n} trajectories in chunks of {chunk}, {shard_chunks} a shard")
    grid = attrs.get("grid")
    if not (isinstance(grid, list) and len(grid) >= 2 and all(_number(g) and g >= 0 for g in grid)
            and all(a > b for a, b in zip(grid, grid[1:]))):
        raise bad("grid", "must be at least 2 finite, non-negative, strictly decreasing noise levels")
    kept = len(grid)
    expected = {"states": ((n, kept, *shape), (chunk, kept, *shape)), "grid": ((kept,), None),
                "shard_done": ((shards,), None)}
    if "seeds" in arrays:
        expected["seeds"] = ((n,), None)
    cond = attrs.get("cond") or {}
    if not isinstance(cond, dict) or not all(isinstance(name, str) and isinstance(s, list)
                                             and all(_int(d, 1, MAX_SAMPLE_VALUES) for d in s)
                                             for name, s in cond.items()):
        raise bad("cond", "must map conditioning names to their shapes")
    expected.update({f"cond/{name}": ((n, *s), (chunk, *s)) for name, s in cond.items()})
    for name, (want_shape, want_chunks) in expected.items():
        if name not in arrays:
            raise StoreMetadataError(f"{path}/{name}: the array is missing")
        got_shape, got_chunks = arrays[name]
        if tuple(got_shape) != want_shape:
            raise StoreMetadataError(f"{path}/{name}/zarr.json: shape {brief(tuple(got_shape))} does not match the "
                                     f"store's attributes, {want_shape}")
        if want_chunks is not None and tuple(got_chunks) != want_chunks:
            raise StoreMetadataError(f"{path}/{name}/zarr.json: chunks {brief(tuple(got_chunks))} do not match the "
                                     f"store's attributes, {want_chunks}")
