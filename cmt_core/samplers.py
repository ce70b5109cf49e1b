"""Few-step samplers, registered by name (the model kind they sample), and the teacher's ODE sampler.

Every sampler maps ``x_T = sigma_max * z`` (``(B, *sample_shape)``) to data with ``steps`` network calls, each
given the rows' conditioning ``cond`` (``cmt_core.conditioning``; None or empty when unconditional):

* ``consistency``: x = f(x_T, T), then for each intermediate sigma s: x = f(x + s e, s); 2 steps re-noise
  to ``mid_sigma``, more steps to a Karras grid from ``mid_sigma`` down to ``sigma_min``;
* ``flow_map`` (flow maps and Mean Flow): jumps sigma_max -> 0 in one step; with more steps sigma_max ->
  ``mid_sigma`` -> down a Karras grid from ``mid_sigma`` to sigma_min whose last point is replaced by 0
  (``cmt_core.objectives.meanflow.sample``); 2 steps: sigma_max -> mid_sigma -> 0;
* the teacher: the last state of an ODE solve (``cmt_core.solvers``).

``FEW_STEP_SAMPLERS`` registers each sampler once; a method declares the one it trains for
(``cmt_core.methods``); a sampler's number of network calls is its ``steps``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cmt_core.conditioning import Cond
from cmt_core.objectives import meanflow
from cmt_core.solvers import solve_config
from cmt_core.time_grids import karras_grid


@torch.no_grad()
def sample_consistency(model, x_T: torch.Tensor, sigma_max: float, mid_sigmas=(), generator=None,
                       cond: Cond | None = None, noises: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Multistep consistency sampling; ``len(mid_sigmas) + 1`` network calls. The re-noising noise of
    intermediate step k is ``noises[k]`` (``(B, *sample_shape)``) when given, else drawn from ``generator``."""
    x = model(x_T, sigma_max, cond=cond)
    for k, s in enumerate(mid_sigmas):
        noise = noises[k] if noises is not None else torch.randn(x.shape, generator=generator)
        x = model(x + s * noise.to(x.device), s, cond=cond)
    return x


def _consistency(model, x_T, steps: int, sigma_max: float, sigma_min: float, mid_sigma: float, generator, cond,
                 noises):
    mids = karras_grid(steps - 2, sigma_min, mid_sigma).tolist() if steps > 2 else [mid_sigma] * (steps - 1)
    return sample_consistency(model, x_T, sigma_max, mids[: steps - 1], generator, cond, noises)


def _flow_map(model, x_T, steps: int, sigma_max: float, sigma_min: float, mid_sigma: float, generator, cond,
              noises):
    grid = karras_grid(steps - 1, sigma_min, mid_sigma) if steps > 1 else torch.zeros(1, dtype=torch.float64)
    grid[-1] = 0.0  # the Karras grid's last point, sigma_min, becomes the jump to the data
    return meanflow.sample(model, x_T, torch.cat([torch.tensor([float(sigma_max)], dtype=grid.dtype), grid]), cond)


FEW_STEP_SAMPLERS = {"consistency": _consistency, "flow_map": _flow_map}


@torch.no_grad()
def sample(sampler: str, model, x_T: torch.Tensor, steps: int, sigma_max: float, sigma_min: float,
           mid_sigma: float, generator: torch.Generator | None = None, cond: Cond | None = None,
           noises: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """``steps``-step samples ``(B, *sample_shape)`` of ``model`` with the sampler ``sampler`` (see above).

    Re-noising samplers draw step k's noise from ``generator``, or take ``noises[k]`` (``(B, *sample_shape)``,
    ``steps - 1`` of them) when given (``cmt_core.generator``: noise that is a function of each image's index)."""
    if sampler not in FEW_STEP_SAMPLERS:
        raise ValueError(f"no few-step sampler {sampler!r}; expected one of {sorted(FEW_STEP_SAMPLERS)}")
    return FEW_STEP_SAMPLERS[sampler](model, x_T, steps, sigma_max, sigma_min, mid_sigma, generator, cond, noises)


@torch.no_grad()
def sample_teacher(denoiser, x_T: torch.Tensor, solver, cond: Cond | None = None) -> torch.Tensor:
    """The end of the teacher's ODE solve from ``x_T`` on the grid of ``solver`` (a ``SolverConfig``)."""
    return solve_config(denoiser, x_T, solver, cond)[:, -1]
