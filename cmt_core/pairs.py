"""Training pairs for consistency mid-training, drawn from teacher trajectories.

A batch is a dict of tensors (this rank's slice of the global batch):
``x_t (B, *shape)`` a trajectory state at noise level ``t (B,)``; ``x_s (B, *shape)`` a later state of the
same trajectory at ``s (B,) < t``. For the CM form ``s`` is the clean end (index T); for the MF and
flow-map forms ``s`` is any later grid point. Epochs run over all (trajectory, i) with i < T: every
trajectory point is used, as in the reference CMT recipe.
"""

from __future__ import annotations

import torch

from cmt_core.data.sources import TensorSource, rank_slice, step_generator


def pair_batch(states: torch.Tensor, grid: torch.Tensor, traj: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> dict:
    """Gather ``x_t = states[traj, i]`` and ``x_s = states[traj, j]`` with their noise levels."""
    return {"x_t": states[traj, i], "t": grid[i].float(), "x_s": states[traj, j], "s": grid[j].float()}


def later_index(i: torch.Tensor, last: int, generator: torch.Generator, to_end: bool) -> torch.Tensor:
    """Target index j: the clean end (``to_end``) or uniform in (i, last]."""
    if to_end:
        return torch.full_like(i, last)
    u = torch.rand(len(i), generator=generator)
    return i + 1 + (u * (last - i)).long().clamp(max=last - i - 1)


class TrajectoryPairs:
    """In-memory pair source over ``states (N, T + 1, *shape)`` with noise levels ``grid (T + 1,)``."""

    def __init__(self, states: torch.Tensor, grid: torch.Tensor, to_end: bool = True, seed: int = 0):
        self.states, self.grid, self.to_end, self.seed = states, grid, to_end, seed
        self.last = states.shape[1] - 1
        flat = torch.arange(states.shape[0] * self.last)
        self.points = TensorSource({"p": flat}, seed)

    def batch(self, step, batch_size, rank=0, world=1):
        p = self.points.indices(step, batch_size)
        traj, i = p // self.last, p % self.last
        j = later_index(i, self.last, step_generator(self.seed, step, stream=4), self.to_end)
        rows = rank_slice(batch_size, rank, world)
        return pair_batch(self.states, self.grid, traj[rows], i[rows], j[rows])
