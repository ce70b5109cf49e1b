"""Checking a trajectory store: completeness, every chunk's checksum and values, and resetting bad shards.

``verify_store(path)`` opens the store (complete or not), lists the shards without a done marker and reads every
written chunk of the states and of the trajectories' conditioning: a chunk that fails its crc32c checksum or its
codec, or holds non-finite values (an absent chunk reads as NaN, the fill value), is reported with its shard.
``reset_bad_shards(path)`` forgets the bad and missing shards of a store marked complete, so that a rollout rerun
recomputes exactly those from their seeds (``cmt store verify --repair``, ``cmt_core.repair``). ``mark_verified``
records a full verification in the store (the rollouts stage does it before publishing), and ``store_problem``
says whether a complete store can be reused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from cmt_core.errors import describe
from cmt_core.trajectories.layout import StoreMetadataError
from cmt_core.trajectories.store import (
    CorruptChunkError,
    missing_shards,
    open_store,
    remove_store,
    reset_shards,
    store_exists,
)

log = logging.getLogger("cmt")


@dataclass
class VerifyReport:
    path: str
    complete: bool
    num_shards: int = 0
    num_chunks: int = 0
    missing_shards: list[int] = field(default_factory=list)
    bad_chunks: list[dict] = field(default_factory=list)  # {"chunk", "shard", "error"}
    error: str | None = None  # the store could not be opened at all

    @property
    def ok(self) -> bool:
        return self.error is None and self.complete and not self.missing_shards and not self.bad_chunks

    @property
    def bad_shards(self) -> list[int]:
        return sorted({b["shard"] for b in self.bad_chunks})

    def summary(self) -> str:
        if self.error:
            return f"{self.path}: BAD - {self.error}"
        lines = [f"{self.path}: {'OK' if self.ok else 'BAD'} - {self.num_chunks} chunks in {self.num_shards} shards, "
                 f"complete={self.complete}"]
        if self.missing_shards:
            lines.append(f"  missing shards ({len(self.missing_shards)}): {self.missing_shards[:20]}")
        for bad in self.bad_chunks[:20]:
            lines.append(f"  bad chunk {bad['chunk']} (shard {bad['shard']}): {bad['error']}")
        if self.bad_chunks:
            lines.append(f"  bad shards: {self.bad_shards}; `cmt store verify --repair {self.path}` recomputes "
                         f"them from their seeds")
        return "\n".join(lines)


def verify_store(path) -> VerifyReport:
    """Check completeness and read every written chunk (checksums, and NaN where a chunk is absent)."""
    try:
        store = open_store(path, partial=True)
    except Exception as err:  # unreadable metadata is a finding, not a crash
        return VerifyReport(str(path), False, error=describe(err))
    missing = missing_shards(store)
    report = VerifyReport(str(path), store.complete, store.num_shards, store.num_chunks, missing)
    skip = set(missing)
    for chunk in range(store.num_chunks):
        shard = store.shard_of_chunk(chunk)
        if shard in skip:
            continue
        try:
            values = [store.read_chunk(chunk), *store.read_cond_chunk(chunk).values()]
        except CorruptChunkError as err:
            report.bad_chunks.append({"chunk": chunk, "shard": shard, "error": str(err.__cause__ or err)})
            continue
        if not all(torch.isfinite(v).all() for v in values):
            report.bad_chunks.append({"chunk": chunk, "shard": shard,
                                      "error": "non-finite values (chunk absent or bad data)"})
    return report


def reset_bad_shards(path) -> list[int]:
    """Reset the shards of a store marked complete that fail ``verify_store`` (damaged or missing chunks), so
    that the rollouts recompute them from their seeds; returns them. A store still being written is left alone; a
    store whose metadata cannot be trusted (``StoreMetadataError``) is removed, named in a warning: every part of it
    is recomputed from its seeds."""
    if not store_exists(path):
        return []
    try:
        store = open_store(path, partial=True)
    except StoreMetadataError as err:
        log.warning("rollouts: %s; removing the store, its trajectories are recomputed from their seeds", err)
        remove_store(path)
        return []
    if not store.complete:
        return []
    report = verify_store(path)
    bad = sorted(set(report.bad_shards) | set(report.missing_shards))
    if bad:
        log.warning("rollouts: %s has %d bad or missing shards %s; recomputing them", path, len(bad), bad[:10])
        reset_shards(path, bad)
    return bad


VERIFIED = "verified"  # store attribute: every chunk was read back and found finite when the store was published


def mark_verified(path) -> VerifyReport:
    """``verify_store``; a sound store is marked ``verified`` (with the number of chunks read back), so reusing it
    later needs no second full read (its chunks keep their checksums). The mark holds no time: identical runs
    write identical stores."""
    report = verify_store(path)
    if report.ok:
        open_store(path, partial=True).group.update_attributes({VERIFIED: {"chunks": report.num_chunks}})
    return report


def store_problem(path) -> str | None:
    """What makes the complete store at ``path`` unsound, in one line, or None: its metadata must hold
    (``cmt_core.trajectories.layout``), and it must have been verified when it was published, or (a store
    published before that was recorded) verify now."""
    try:
        store = open_store(path)
    except Exception as err:  # lying metadata, an incomplete store
        return describe(err)
    if store.attrs.get(VERIFIED):
        return None
    report = verify_store(path)
    if report.ok:
        return None
    first = report.bad_chunks[0] if report.bad_chunks else None
    return (f"{len(report.bad_chunks)} bad chunks, first chunk {first['chunk']}: {first['error']}" if first
            else report.summary().replace("\n", "; "))
