"""Teacher rollouts: deterministic ODE trajectories from x_T = sigma_max * z.

Trajectory k starts from noise drawn from the stream ``TRAJECTORY_NOISE`` keyed by (seed, k), so any split of the
trajectories over batches, processes or machines produces the same states bit for bit (on one device
type). ``rollout(...)`` returns states ``(N, T + 1, *sample_shape)`` ordered from noise (index 0) to the
clean end (index T) and the grid ``(T + 1,)`` of their noise levels.

A class-conditional teacher (``num_classes > 0``) solves trajectory k for the class drawn uniformly from the
stream ``TRAJECTORY_LABEL`` keyed by (seed, k), data-free, as the reference's ImageNet rollouts draw random
labels; the trajectory's conditioning (``cmt_core.conditioning``) is kept beside its states.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from cmt_core import conditioning
from cmt_core.rng import Stream, seed_of
from cmt_core.solvers import solve_config
from cmt_core.time_grids import make_grid


@dataclass
class Trajectories:
    states: torch.Tensor  # (N, T + 1, *sample_shape), index 0 = noise end
    grid: torch.Tensor  # (T + 1,) float64, decreasing
    seeds: torch.Tensor  # (N,) int64: the seed of each trajectory's noise
    cond: dict = field(default_factory=dict)  # each trajectory's conditioning (N, ...); empty: unconditional


def trajectory_seed(seed: int, index: int) -> int:
    """The seed of trajectory ``index``'s noise (stored in the trajectory store's ``seeds``)."""
    return seed_of(Stream.TRAJECTORY_NOISE, seed, index)


def trajectory_seeds(seed: int, num: int) -> torch.Tensor:
    """``(num,)`` int64: ``trajectory_seed(seed, k)`` for k < num."""
    return torch.tensor([trajectory_seed(seed, k) for k in range(num)], dtype=torch.int64)


def initial_noise(seed: int, indices, sample_shape: tuple[int, ...], sigma_max: float) -> torch.Tensor:
    """x_T for the trajectories ``indices``: ``(len(indices), *sample_shape)``, float32."""
    noises = [torch.randn(sample_shape, generator=torch.Generator().manual_seed(trajectory_seed(seed, int(k))))
              for k in indices]
    return torch.stack(noises) * sigma_max


def trajectory_cond(seed: int, indices, num_classes: int) -> dict:
    """The conditioning of the trajectories ``indices``: ``{}`` when unconditional (``num_classes`` 0), else their
    one-hot ``class_labels`` ``(len(indices), num_classes)``, each drawn uniformly from (seed, k)."""
    if not num_classes:
        return {}
    labels = [int(torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(
        seed_of(Stream.TRAJECTORY_LABEL, seed, int(k))))) for k in indices]
    return conditioning.class_cond(torch.tensor(labels, dtype=torch.int64), num_classes)


def rollout_batch(denoiser, seed: int, indices, sample_shape, solver, device="cpu",
                  cond: conditioning.Cond | None = None) -> torch.Tensor:
    """States ``(len(indices), T + 1, *sample_shape)`` (float32, on CPU) of the given trajectories, solved on the
    grid of ``solver`` (a ``SolverConfig``) for their conditioning ``cond`` (``trajectory_cond``)."""
    x = initial_noise(seed, indices, tuple(sample_shape), solver.sigma_max).to(device)
    return solve_config(denoiser, x, solver, conditioning.to_device(cond, device)).float().cpu()


def rollout(denoiser, num: int, sample_shape, solver, seed: int = 0, batch_size: int = 512,
            device="cpu", progress: bool = True, num_classes: int = 0) -> Trajectories:
    """All ``num`` trajectories in memory, solved ``batch_size`` at a time (``num_classes``: see the module)."""
    parts, conds = [], []
    for start in tqdm(range(0, num, batch_size), desc="rollouts", disable=not progress, unit="batch"):
        indices = range(start, min(start + batch_size, num))
        conds.append(trajectory_cond(seed, indices, num_classes))
        parts.append(rollout_batch(denoiser, seed, indices, sample_shape, solver, device, conds[-1]))
    return Trajectories(torch.cat(parts), make_grid(solver), trajectory_seeds(seed, num), conditioning.concat(conds))
