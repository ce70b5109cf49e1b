"""Streaming CMT training pairs from a trajectory store (the on-disk twin of ``pairs.TrajectoryPairs``).

``StorePairs(path, to_end, seed).batch(step, batch_size, rank, world)`` returns the same dict as
``TrajectoryPairs``: ``x_t (B, *shape)`` the state of a trajectory at ``t = grid[i] (B,)`` and ``x_s``
the state at ``s = grid[j]``, with j the last kept state (``to_end``) or uniform in (i, last], drawn from
a generator seeded by (seed, step). An epoch visits every point (trajectory, i), i < last, once.

Order, built so that reads are sequential chunks while batches stay well mixed:

1. each epoch shuffles the order of the chunks (seeded by (seed, epoch));
2. consecutive runs of ``buffer_chunks`` chunks of that order form a buffer, whose points are shuffled
   (seeded by (seed, epoch, buffer));
3. the epoch is the concatenation of the shuffled buffers, the stream the concatenation of epochs, and
   step k takes stream positions [k B, (k + 1) B) - a pure function of the step, so a resumed run
   continues the epoch exactly where it stopped without saving iterator state.

DDP: rank r takes rows [r B / world, (r + 1) B / world) of the global batch of the step, so the ranks'
pairs are disjoint and every pair of an epoch appears once across them; each rank reads only the chunks
its rows need. A background thread reads the chunks of the next ``prefetch`` buffers while the current
one is trained on; decoded chunks live in a small LRU cache of ``buffer_chunks * (prefetch + 2)`` chunks.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from cmt_core.data.sources import rank_slice, step_generator
from cmt_core.pairs import later_index
from cmt_core.trajectory_store import open_store


def _generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of non-negative integers (no collisions between tuples)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


class _Epoch:
    """Chunk order and buffer boundaries of one epoch (offsets in points)."""

    def __init__(self, order: torch.Tensor, chunk_points: torch.Tensor, buffer_chunks: int):
        self.order = order
        points = chunk_points[order]
        self.chunk_start = torch.cat([torch.zeros(1, dtype=torch.int64), points.cumsum(0)])  # by position in order
        self.buffer_start = self.chunk_start[::buffer_chunks]
        if self.buffer_start[-1] != self.chunk_start[-1]:
            self.buffer_start = torch.cat([self.buffer_start, self.chunk_start[-1:]])

    @property
    def num_buffers(self) -> int:
        return len(self.buffer_start) - 1


class StorePairs:
    """BatchSource of CMT pairs read from the complete trajectory store at ``path``."""

    def __init__(self, path, to_end: bool = True, seed: int = 0, buffer_chunks: int = 4, prefetch: int = 1):
        if buffer_chunks < 1 or prefetch < 0:
            raise ValueError(f"need buffer_chunks >= 1 and prefetch >= 0, got {buffer_chunks}, {prefetch}")
        self.store = open_store(path)
        self.to_end, self.seed = to_end, seed
        self.buffer_chunks, self.prefetch = buffer_chunks, prefetch
        self.grid = self.store.grid
        self.last = self.store.states.shape[1] - 1
        self.chunk_trajectories = self.store.chunk_trajectories
        sizes = torch.tensor([b - a for a, b in map(self.store.chunk_range, range(self.store.num_chunks))])
        self.chunk_points = sizes * self.last
        self.size = int(self.chunk_points.sum())  # points per epoch
        self.cache_chunks = buffer_chunks * (prefetch + 2)
        self._cache: OrderedDict[int, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="store-prefetch") if prefetch else None
        self._epochs: OrderedDict[int, _Epoch] = OrderedDict()
        self._perms: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return self.size

    # -------------------------------------------------------------------------------------- order
    def _epoch(self, epoch: int) -> _Epoch:
        if epoch not in self._epochs:
            order = torch.randperm(self.store.num_chunks, generator=_generator(self.seed, epoch))
            self._epochs[epoch] = _Epoch(order, self.chunk_points, self.buffer_chunks)
            if len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def _permutation(self, epoch: int, buffer: int, size: int) -> torch.Tensor:
        key = (epoch, buffer)
        if key not in self._perms:
            self._perms[key] = torch.randperm(size, generator=_generator(self.seed, epoch, buffer + 1))
            if len(self._perms) > 8:
                self._perms.popitem(last=False)
        return self._perms[key]

    def _locate(self, epoch: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Epoch positions ``q`` -> (chunk, row in chunk, time index i)."""
        layout = self._epoch(epoch)
        buffer = torch.searchsorted(layout.buffer_start, q, right=True) - 1
        point = torch.empty_like(q)  # position in the epoch's chunk order, before buffer shuffling
        for b in buffer.unique().tolist():
            sel = buffer == b
            start, stop = int(layout.buffer_start[b]), int(layout.buffer_start[b + 1])
            point[sel] = start + self._permutation(epoch, b, stop - start)[q[sel] - start]
        position = torch.searchsorted(layout.chunk_start, point, right=True) - 1
        local = point - layout.chunk_start[position]
        return layout.order[position], local // self.last, local % self.last

    def pair_indices(self, step: int, batch_size: int) -> dict[str, torch.Tensor]:
        """The global batch of ``step`` as indices: ``traj, i, j`` and ``chunk, row`` (row of traj in chunk)."""
        start = step * batch_size
        pos = torch.arange(start, start + batch_size, dtype=torch.int64)
        epoch = pos // self.size
        chunk, row, i = (torch.empty_like(pos) for _ in range(3))
        for e in epoch.unique().tolist():
            sel = epoch == e
            chunk[sel], row[sel], i[sel] = self._locate(e, pos[sel] - e * self.size)
        j = later_index(i, self.last, step_generator(self.seed, step, stream=4), self.to_end)
        return {"traj": chunk * self.chunk_trajectories + row, "i": i, "j": j, "chunk": chunk, "row": row}

    # -------------------------------------------------------------------------------------- reads
    def _chunk(self, chunk: int, background: bool = False) -> Future:
        """The cached (or pending) read of ``chunk``; read here unless ``background``."""
        with self._lock:
            future = self._cache.get(chunk)
            if future is not None:
                self._cache.move_to_end(chunk)
                return future
            future = self._executor.submit(self.store.read_chunk, chunk) if background else Future()
            self._cache[chunk] = future
            while len(self._cache) > self.cache_chunks:
                self._cache.popitem(last=False)
        if not background:
            try:
                future.set_result(self.store.read_chunk(chunk))
            except Exception as err:
                future.set_exception(err)
        return future

    def _prefetch_after(self, position: int) -> None:
        """Start reading the chunks of the ``prefetch`` buffers that follow stream ``position``."""
        epoch, q = divmod(position, self.size)
        layout = self._epoch(epoch)
        buffer = int(torch.searchsorted(layout.buffer_start, torch.tensor(q), right=True)) - 1
        for _ in range(self.prefetch):
            buffer += 1
            if buffer >= layout.num_buffers:
                epoch, buffer = epoch + 1, 0
                layout = self._epoch(epoch)
            for chunk in layout.order[buffer * self.buffer_chunks:(buffer + 1) * self.buffer_chunks].tolist():
                self._chunk(chunk, background=True)

    def batch(self, step, batch_size, rank=0, world=1):
        idx = self.pair_indices(step, batch_size)
        rows = rank_slice(batch_size, rank, world)
        chunk, row, i, j = (idx[k][rows] for k in ("chunk", "row", "i", "j"))
        x_t = torch.empty(len(chunk), *self.store.sample_shape)
        x_s = torch.empty_like(x_t)
        for c in chunk.unique().tolist():
            sel = (chunk == c).nonzero().flatten()
            states = self._chunk(c).result()
            x_t[sel], x_s[sel] = states[row[sel], i[sel]], states[row[sel], j[sel]]
        if self._executor is not None:
            self._prefetch_after((step + 1) * batch_size - 1)
        return {"x_t": x_t, "t": self.grid[i].float(), "x_s": x_s, "s": self.grid[j].float()}

    def close(self) -> None:
        """Stop the prefetch thread (pending reads are dropped)."""
        if getattr(self, "_executor", None) is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def __del__(self):
        self.close()
