"""Few-step samplers and the teacher's ODE sampler; every sampler maps x_T = sigma_max * z to data.

* consistency model: x = f(x_T, T), then for each intermediate sigma s: x = f(x + s e, s)
* flow map / Mean Flow: x_{t_{k+1}} = f(x_{t_k}, t_k, t_{k+1}) = x - (t_k - t_{k+1}) u(x, t_{k+1}, t_k) on a grid
  ending at 0; one step is x_0 = x_T - T u(x_T, 0, T)
* teacher: the last state of an ODE solve (``cmt_core.solvers``)
"""

from __future__ import annotations

import torch

from cmt_core.config import SolverConfig
from cmt_core.solvers import solve_config
from cmt_core.time_grids import karras_grid


@torch.no_grad()
def sample_consistency(model, x_T: torch.Tensor, sigma_max: float, mid_sigmas=(), generator=None) -> torch.Tensor:
    """Multistep consistency sampling; ``len(mid_sigmas) + 1`` network calls."""
    x = model(x_T, sigma_max)
    for s in mid_sigmas:
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        x = model(x + s * noise, s)
    return x


@torch.no_grad()
def sample_flow_map(model, x_T: torch.Tensor, grid) -> torch.Tensor:
    """Flow-map jumps along the decreasing ``grid`` (first entry sigma_max, last usually 0)."""
    x = x_T
    for t, s in zip(grid[:-1], grid[1:]):
        x = model(x, float(t), float(s))
    return x


def flow_map_grid(steps: int, sigma_max: float, sigma_min: float = 0.002, rho: float = 7.0) -> torch.Tensor:
    """``steps`` jumps along a Karras grid from sigma_max, the last one to 0."""
    return karras_grid(steps, sigma_min, sigma_max, rho, to_zero=True)


@torch.no_grad()
def sample_teacher(denoiser, x_T: torch.Tensor, solver: SolverConfig) -> torch.Tensor:
    return solve_config(denoiser, x_T, solver)[:, -1]


def sample(kind: str, model, x_T: torch.Tensor, steps: int, sigma_max: float, mid_sigma: float,
           generator=None) -> torch.Tensor:
    """``steps``-step sample of a ``consistency`` or ``flow_map`` model (the evaluation's entry point).

    Consistency models re-noise to ``mid_sigma`` (2 steps) or to a Karras grid between it and
    sigma_min (more steps); flow maps jump along ``flow_map_grid``."""
    if kind == "consistency":
        mids = karras_grid(steps - 2, 0.002, mid_sigma).tolist() if steps > 2 else [mid_sigma] * (steps - 1)
        return sample_consistency(model, x_T, sigma_max, mids[: steps - 1], generator)
    if kind == "flow_map":
        return sample_flow_map(model, x_T, flow_map_grid(steps, sigma_max))
    raise ValueError(f"no few-step sampler for model kind {kind!r}")
