"""Few-step samplers, registered by model kind, and the teacher's ODE sampler.

Every sampler maps ``x_T = sigma_max * z`` (``(B, *sample_shape)``) to data with ``steps`` network calls:

* ``consistency``: x = f(x_T, T), then for each intermediate sigma s: x = f(x + s e, s); 2 steps re-noise
  to ``mid_sigma``, more steps to a Karras grid from ``mid_sigma`` down to ``sigma_min``;
* ``flow_map`` (flow maps and Mean Flow): jumps sigma_max -> 0 in one step; with more steps sigma_max ->
  ``mid_sigma`` -> down a Karras grid from ``mid_sigma`` to sigma_min whose last point is replaced by 0
  (``cmt_core.objectives.meanflow.sample``); 2 steps: sigma_max -> mid_sigma -> 0;
* the teacher: the last state of an ODE solve (``cmt_core.solvers``).

``FEW_STEP_SAMPLERS`` registers each kind once; a kind's number of network calls is its ``steps``.
"""

from __future__ import annotations

import torch

from cmt_core.config import SolverConfig
from cmt_core.objectives import meanflow
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


def _consistency(model, x_T, steps: int, sigma_max: float, sigma_min: float, mid_sigma: float, generator):
    mids = karras_grid(steps - 2, sigma_min, mid_sigma).tolist() if steps > 2 else [mid_sigma] * (steps - 1)
    return sample_consistency(model, x_T, sigma_max, mids[: steps - 1], generator)


def _flow_map(model, x_T, steps: int, sigma_max: float, sigma_min: float, mid_sigma: float, generator):
    grid = karras_grid(steps - 1, sigma_min, mid_sigma) if steps > 1 else torch.zeros(1, dtype=torch.float64)
    grid[-1] = 0.0  # the Karras grid's last point, sigma_min, becomes the jump to the data
    return meanflow.sample(model, x_T, torch.cat([torch.tensor([float(sigma_max)], dtype=grid.dtype), grid]))


FEW_STEP_SAMPLERS = {"consistency": _consistency, "flow_map": _flow_map}


@torch.no_grad()
def sample(kind: str, model, x_T: torch.Tensor, steps: int, sigma_max: float, sigma_min: float,
           mid_sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``steps``-step samples ``(B, *sample_shape)`` of a model of ``kind`` (see the module docstring)."""
    if kind not in FEW_STEP_SAMPLERS:
        raise ValueError(f"no few-step sampler for model kind {kind!r}; expected one of {sorted(FEW_STEP_SAMPLERS)}")
    return FEW_STEP_SAMPLERS[kind](model, x_T, steps, sigma_max, sigma_min, mid_sigma, generator)


@torch.no_grad()
def sample_teacher(denoiser, x_T: torch.Tensor, solver: SolverConfig) -> torch.Tensor:
    return solve_config(denoiser, x_T, solver)[:, -1]
