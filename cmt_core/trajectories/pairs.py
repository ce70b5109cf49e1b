"""CMT training pairs drawn from teacher trajectories: in memory (``TrajectoryPairs``) or streamed from a
trajectory store (``StorePairs``).

``source.batch(step, batch_size, rank, world)`` returns this rank's slice of the step's global batch:
``x_t (B, *shape)`` a trajectory state at noise level ``t = grid[i] (B,)``, ``x_s (B, *shape)`` a later
state of the same trajectory at ``s = grid[j] < t`` and ``cond`` the trajectory's conditioning (what the teacher
solved it for; empty for an unconditional store): the clean end for the CM form (``to_end``), uniform in
(i, last] for the MF and flow-map forms (stream ``PAIR_TARGET`` keyed by the step). An epoch visits every
point (trajectory, i), i < last, once: every trajectory point is used, as in the reference CMT recipe.

``StorePairs`` reads in an order built so that reads are sequential chunks while batches stay well mixed:

1. each epoch shuffles the order of the chunks (stream ``STORE_ORDER`` keyed by the epoch);
2. consecutive runs of ``buffer_chunks`` chunks of that order form a buffer, whose points are shuffled
   (keyed by the epoch and buffer);
3. the epoch is the concatenation of the shuffled buffers, the stream the concatenation of epochs, and
   step k takes stream positions [k B, (k + 1) B) - a pure function of the step, so a resumed run
   continues the epoch exactly where it stopped without saving iterator state.

DDP: rank r takes rows [r B / world, (r + 1) B / world) of the global batch of the step, so the ranks'
pairs are disjoint and every pair of an epoch appears once across them; a rank reads only the buffers its
rows fall in. A background thread reads (and decodes) the next ``prefetch`` buffers while the current one
is trained on; the decoded chunks of a buffer are kept concatenated, so a batch is two gathers, in a small
LRU cache of ``prefetch + 2`` buffers (memory: ``buffer_chunks * (prefetch + 2)`` decoded float32 chunks).
"""

from __future__ import annotations

import threading
from bisect import bisect_right
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from cmt_core import conditioning
from cmt_core.data.sources import EpochSampler, rank_slice
from cmt_core.rng import Stream, generator
from cmt_core.trajectories.store import REMOTE_CACHE_BYTES, open_store


def pair_batch(states: torch.Tensor, grid: torch.Tensor, traj: torch.Tensor, i: torch.Tensor, j: torch.Tensor,
               cond: conditioning.Cond | None = None) -> dict:
    """Gather ``x_t = states[traj, i]`` and ``x_s = states[traj, j]`` with their noise levels and the
    trajectories' conditioning (``cond``: ``(N, ...)`` per entry)."""
    return {"x_t": states[traj, i], "t": grid[i].float(), "x_s": states[traj, j], "s": grid[j].float(),
            "cond": conditioning.select(cond, traj)}


def target_index(i: torch.Tensor, last: int, seed: int, step: int, to_end: bool) -> torch.Tensor:
    """Target index j of step ``step``: the clean end (``to_end``) or uniform in (i, last]."""
    if to_end:
        return torch.full_like(i, last)
    u = torch.rand(len(i), generator=generator(Stream.PAIR_TARGET, seed, step))
    return i + 1 + (u * (last - i)).long().clamp(max=last - i - 1)


class TrajectoryPairs:
    """In-memory pair source over ``states (N, T + 1, *shape)`` with noise levels ``grid (T + 1,)`` and the
    trajectories' conditioning ``cond`` (``(N, ...)`` per entry; None: unconditional)."""

    def __init__(self, states: torch.Tensor, grid: torch.Tensor, to_end: bool = True, seed: int = 0,
                 cond: conditioning.Cond | None = None):
        self.states, self.grid, self.to_end, self.seed, self.cond = states, grid, to_end, seed, cond
        self.last = states.shape[1] - 1
        self.points = EpochSampler(states.shape[0] * self.last, seed)

    def batch(self, step, batch_size, rank=0, world=1):
        p = self.points.indices(step, batch_size)
        traj, i = p // self.last, p % self.last
        j = target_index(i, self.last, self.seed, step, self.to_end)
        rows = rank_slice(batch_size, rank, world)
        return pair_batch(self.states, self.grid, traj[rows], i[rows], j[rows], self.cond)


class _Epoch:
    """Chunk order of one epoch, cut into buffers; ``start[b]`` is buffer b's first point in the epoch."""

    def __init__(self, order: list[int], chunk_sizes: list[int], buffer_chunks: int, last: int):
        self.buffers = [order[b:b + buffer_chunks] for b in range(0, len(order), buffer_chunks)]
        rows = [sum(chunk_sizes[c] for c in chunks) for chunks in self.buffers]
        self.start = [0]
        for r in rows:
            self.start.append(self.start[-1] + r * last)


@dataclass
class _Segment:
    """Batch positions [first, first + len(rows)) that fall in one buffer: their rows in it and time indices."""

    epoch: int
    buffer: int
    first: int
    rows: torch.Tensor
    i: torch.Tensor


class StorePairs:
    """BatchSource of CMT pairs read from the complete trajectory store at ``path``."""

    def __init__(self, path, to_end: bool = True, seed: int = 0, buffer_chunks: int = 4, prefetch: int = 1,
                 cache_bytes: int = REMOTE_CACHE_BYTES):
        if buffer_chunks < 1 or prefetch < 0:
            raise ValueError(f"need buffer_chunks >= 1 and prefetch >= 0, got {buffer_chunks}, {prefetch}")
        self.store = open_store(path, cache_bytes=cache_bytes)  # ``cache_bytes``: a store at a URL (``open_store``)
        self.to_end, self.seed = to_end, seed
        self.buffer_chunks, self.prefetch = buffer_chunks, prefetch
        self.grid = self.store.grid
        self.last = self.store.states.shape[1] - 1
        self.chunk_sizes = [b - a for a, b in map(self.store.chunk_range, range(self.store.num_chunks))]
        self.size = len(self.store) * self.last  # points per epoch
        self.cache_buffers = prefetch + 2
        self._cache: OrderedDict[tuple[int, int], Future] = OrderedDict()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="store-prefetch") if prefetch else None
        self._readers = ThreadPoolExecutor(buffer_chunks, thread_name_prefix="store-read")
        self._epochs: OrderedDict[int, _Epoch] = OrderedDict()
        self._perms: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return self.size

    # -------------------------------------------------------------------------------------- order
    def _epoch(self, epoch: int) -> _Epoch:
        if epoch not in self._epochs:
            g = generator(Stream.STORE_ORDER, self.seed, epoch)
            order = torch.randperm(self.store.num_chunks, generator=g).tolist()
            self._epochs[epoch] = _Epoch(order, self.chunk_sizes, self.buffer_chunks, self.last)
            if len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def _permutation(self, epoch: int, buffer: int) -> torch.Tensor:
        key = (epoch, buffer)
        if key not in self._perms:
            start = self._epoch(epoch).start
            size = start[buffer + 1] - start[buffer]
            g = generator(Stream.STORE_ORDER, self.seed, epoch, buffer + 1)
            self._perms[key] = torch.randperm(size, generator=g)
            if len(self._perms) > 8:
                self._perms.popitem(last=False)
        return self._perms[key]

    def _segments(self, step: int, batch_size: int) -> list[_Segment]:
        """Stream positions [step B, (step + 1) B), cut where they cross into another buffer."""
        first, stop = step * batch_size, (step + 1) * batch_size
        segments, pos = [], first
        while pos < stop:
            epoch, q = divmod(pos, self.size)
            start = self._epoch(epoch).start
            buffer = bisect_right(start, q) - 1
            n = min(stop - pos, start[buffer + 1] - q)
            offset = q - start[buffer]
            point = self._permutation(epoch, buffer)[offset:offset + n]  # = row in buffer * last + i
            segments.append(_Segment(epoch, buffer, pos - first, point // self.last, point % self.last))
            pos += n
        return segments

    def pair_indices(self, step: int, batch_size: int) -> dict[str, torch.Tensor]:
        """The global batch of ``step`` as indices ``traj, i, j`` (and ``chunk`` of each trajectory)."""
        segments = self._segments(step, batch_size)
        traj = []
        for seg in segments:
            chunks = self._epoch(seg.epoch).buffers[seg.buffer]
            ids = torch.cat([torch.arange(*self.store.chunk_range(c)) for c in chunks])
            traj.append(ids[seg.rows])
        traj, i = torch.cat(traj), torch.cat([seg.i for seg in segments])
        j = target_index(i, self.last, self.seed, step, self.to_end)
        return {"traj": traj, "i": i, "j": j, "chunk": traj // self.store.chunk_trajectories}

    # -------------------------------------------------------------------------------------- reads
    def _read_chunk(self, chunk: int) -> tuple[torch.Tensor, dict]:
        return self.store.read_chunk(chunk), self.store.read_cond_chunk(chunk)

    def _read_buffer(self, chunks: list[int]) -> tuple[torch.Tensor, dict]:
        """States ``(rows, K, *sample_shape)`` and conditioning ``{name: (rows, ...)}`` of the buffer's chunks, in
        buffer order (read concurrently)."""
        parts = list(self._readers.map(self._read_chunk, chunks))
        if len(parts) == 1:
            return parts[0]
        return torch.cat([states for states, _ in parts]), conditioning.concat([cond for _, cond in parts])

    def _buffer(self, epoch: int, buffer: int, background: bool = False) -> Future:
        """The cached (or pending) read of a buffer; read here and now unless ``background``."""
        key = (epoch, buffer)
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            chunks = self._epoch(epoch).buffers[buffer]
            future = self._executor.submit(self._read_buffer, chunks) if background else Future()
            self._cache[key] = future
            while len(self._cache) > self.cache_buffers:
                self._cache.popitem(last=False)
        if not background:
            try:
                future.set_result(self._read_buffer(chunks))
            except Exception as err:
                future.set_exception(err)
        return future

    def _prefetch_after(self, epoch: int, buffer: int) -> None:
        """Start reading the ``prefetch`` buffers that follow (epoch, buffer) in the stream."""
        for _ in range(self.prefetch):
            buffer += 1
            if buffer >= len(self._epoch(epoch).buffers):
                epoch, buffer = epoch + 1, 0
            self._buffer(epoch, buffer, background=True)

    def batch(self, step, batch_size, rank=0, world=1):
        segments = self._segments(step, batch_size)
        i = segments[0].i if len(segments) == 1 else torch.cat([seg.i for seg in segments])
        j = target_index(i, self.last, self.seed, step, self.to_end)
        rows = rank_slice(batch_size, rank, world)
        x_t, x_s, conds = [], [], []
        for seg in segments:
            lo, hi = max(seg.first, rows.start), min(seg.first + len(seg.rows), rows.stop)
            if lo < hi:
                states, cond = self._buffer(seg.epoch, seg.buffer).result()
                r = seg.rows[lo - seg.first:hi - seg.first]
                x_t.append(states[r, i[lo:hi]])
                x_s.append(states[r, j[lo:hi]])
                conds.append(conditioning.select(cond, r))
        if self._executor is not None:
            self._prefetch_after(segments[-1].epoch, segments[-1].buffer)
        i, j = i[rows], j[rows]
        return {"x_t": x_t[0] if len(x_t) == 1 else torch.cat(x_t), "t": self.grid[i].float(),
                "x_s": x_s[0] if len(x_s) == 1 else torch.cat(x_s), "s": self.grid[j].float(),
                "cond": conditioning.concat(conds)}

    def close(self) -> None:
        """Stop the prefetch thread (pending reads are dropped)."""
        if getattr(self, "_executor", None) is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        if getattr(self, "_readers", None) is not None:
            self._readers.shutdown(wait=False, cancel_futures=True)
            self._readers = None

    def __del__(self):
        self.close()
