"""Deterministic solvers of the probability-flow ODE ``dx/dt = (x - D(x, t)) / t`` (EDM sigma time).

Each solver is a pure function of (denoiser, start state, grid) and returns the whole trajectory
``(B, N + 1, *sample_shape)``: index 0 is the start ``x_{t_0}`` (noise end), index N the end of the grid.
``denoiser(x, t: (B,)) -> x_0 estimate``. The grid is decreasing, ``(N + 1,)`` shared by the batch or
``(N + 1, B)`` per sample; a final sigma = 0 is allowed (the step then returns the denoiser's estimate, as
EDM's Heun sampler does).

``SOLVERS`` registers every solver once (name -> function and its number of denoiser calls); the
configs' solver choices (``cmt_core.config.SolverName``) are its keys. A new solver is one function and
one entry.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cmt_core.time_grids import make_grid

DenoiserFn = Callable[..., torch.Tensor]


def _d(denoiser: DenoiserFn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return denoiser(x, t.to(x.dtype).expand(x.shape[0]))


def _b(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A grid time (scalar or ``(B,)``) broadcastable against ``x``."""
    return t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) if t.ndim else t.to(x.dtype)


def _euler_step(denoiser: DenoiserFn, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor):
    """``(x_next, d)``: one Euler step along the ODE's velocity ``d = (x - D(x, t)) / t``."""
    d = (x - _d(denoiser, x, t)) / _b(t, x)
    return x + _b(t_next - t, x) * d, d


@torch.no_grad()
def euler(denoiser: DenoiserFn, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """First-order Euler: one denoiser call per step."""
    states = [x]
    for t, t_next in zip(grid[:-1], grid[1:]):
        x, _ = _euler_step(denoiser, x, t, t_next)
        states.append(x)
    return torch.stack(states, dim=1)


@torch.no_grad()
def heun(denoiser: DenoiserFn, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """EDM's second-order Heun: two calls per step, one on a final step to sigma = 0."""
    states = [x]
    for t, t_next in zip(grid[:-1], grid[1:]):
        x_euler, d = _euler_step(denoiser, x, t, t_next)
        if (t_next > 0).any():
            safe_next = t_next.clamp(min=1e-12)
            d_next = (x_euler - _d(denoiser, x_euler, safe_next)) / _b(safe_next, x)
            x = torch.where(_b(t_next, x) > 0, x + _b(t_next - t, x) * (d + d_next) / 2, x_euler)
        else:
            x = x_euler
        states.append(x)
    return torch.stack(states, dim=1)


@torch.no_grad()
def dpm_solver_pp(denoiser: DenoiserFn, x: torch.Tensor, grid: torch.Tensor, order: int = 2) -> torch.Tensor:
    """DPM-Solver++ multistep (order 2 or 3) in data prediction, one denoiser call per step.

    With lambda = -ln sigma and h = lambda_next - lambda, the exact solution of the linear part is
    x_next = (t_next / t) x + (1 - e^-h) D; the multistep correction adds phi_2 D' (+ phi_3 D'') from
    divided differences of the previous denoiser outputs (lower order at the first steps).
    """
    if order not in (2, 3):
        raise ValueError(f"order must be 2 or 3, got {order}")
    states, history, steps = [x], [], []  # history: previous denoised; steps: previous h
    for t, t_next in zip(grid[:-1], grid[1:]):
        denoised = _d(denoiser, x, t)
        if (t_next == 0).all():
            x = denoised
        else:
            if (t_next == 0).any() and history:
                raise ValueError("DPM-Solver++ multistep needs a grid that reaches sigma = 0 for all samples at once")
            to_zero = _b(t_next, x) == 0
            h = _b(torch.log(t / t_next.clamp(min=1e-12)), x)
            x = _b(t_next / t, x) * x - torch.expm1(-h) * denoised
            x = torch.where(to_zero, denoised, x)  # a single step to 0 (per-sample grids) lands on D
            phi_2 = torch.expm1(-h) / h + 1
            if len(history) >= 2 and order == 3:
                r0, r1 = steps[-1] / h, steps[-2] / h
                d1_0 = (denoised - history[-1]) / r0
                d1_1 = (history[-1] - history[-2]) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h - 0.5) * d2
            elif history:
                x = x + phi_2 * (denoised - history[-1]) / (steps[-1] / h)
            steps.append(h)
        history = (history + [denoised])[-2:]
        states.append(x)
    return torch.stack(states, dim=1)


def _one_call_per_step(grid: torch.Tensor) -> int:
    return len(grid) - 1


def _heun_calls(grid: torch.Tensor) -> int:
    return 2 * (len(grid) - 1) - int(grid[-1] == 0)


@dataclass(frozen=True)
class Solver:
    run: Callable[[DenoiserFn, torch.Tensor, torch.Tensor], torch.Tensor]  # (denoiser, x, grid) -> states
    function_evaluations: Callable[[torch.Tensor], int]  # grid -> denoiser calls


SOLVERS: dict[str, Solver] = {
    "euler": Solver(euler, _one_call_per_step),
    "heun": Solver(heun, _heun_calls),
    "dpm2m": Solver(functools.partial(dpm_solver_pp, order=2), _one_call_per_step),
    "dpm3m": Solver(functools.partial(dpm_solver_pp, order=3), _one_call_per_step),
}


def get_solver(name: str) -> Solver:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; expected one of {sorted(SOLVERS)}")
    return SOLVERS[name]


def solve(denoiser: DenoiserFn, x: torch.Tensor, grid: torch.Tensor, name: str) -> torch.Tensor:
    """The trajectory ``(B, N + 1, *sample_shape)`` of the registered solver ``name`` on ``grid``."""
    return get_solver(name).run(denoiser, x, grid)


def function_evaluations(name: str, grid: torch.Tensor) -> int:
    """Number of denoiser calls the solver ``name`` makes on ``grid``."""
    return get_solver(name).function_evaluations(grid)


def solve_config(denoiser: DenoiserFn, x: torch.Tensor, cfg) -> torch.Tensor:
    """Solve on the grid of a ``SolverConfig``; ``x`` is the start state at ``cfg.sigma_max``."""
    return solve(denoiser, x, make_grid(cfg).to(x.device), cfg.name)
