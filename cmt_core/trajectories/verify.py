"""Checking a trajectory store: completeness, every chunk's checksum and values, and resetting bad shards.

``verify_store(path)`` opens the store (complete or not), lists the shards without a done marker and reads every
written chunk of the states and of the trajectories' conditioning: a chunk that fails its crc32c checksum or its
codec, or holds non-finite values (an absent chunk reads as NaN, the fill value), is reported with its shard.
``reset_bad_shards(path)`` forgets the bad and missing shards of a store marked complete, so that a rollout rerun
recomputes exactly those from their seeds (``cmt store verify --repair``, ``cmt_core.repair``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from cmt_core.trajectories.store import CorruptChunkError, missing_shards, open_store, reset_shards, store_exists

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
        return VerifyReport(str(path), False, error=f"{type(err).__name__}: {err}")
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
    that the rollouts recompute them from their seeds; returns them. A store still being written is left alone."""
    if not store_exists(path) or not open_store(path, partial=True).complete:
        return []
    report = verify_store(path)
    bad = sorted(set(report.bad_shards) | set(report.missing_shards))
    if bad:
        log.warning("rollouts: %s has %d bad or missing shards %s; recomputing them", path, len(bad), bad[:10])
        reset_shards(path, bad)
    return bad
