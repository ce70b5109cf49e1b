"""Deterministic solvers of the probability-flow ODE ``dx/dt = (x - D(x, t)) / t`` (EDM sigma time).

Each solver is a pure function of (denoiser, start state, grid) and returns the whole trajectory
``(B, N + 1, *sample_shape)``: index 0 is the start ``x_{t_0}`` (noise end), index N the end of the grid.
``denoiser(x, t: (B,), labels) -> x_0 estimate``. The grid is decreasing, ``(N + 1,)`` shared by the batch or
``(N + 1, B)`` per sample; a final sigma = 0 is allowed (the step then returns the denoiser's estimate, as
EDM's Heun sampler does).
"""

from __future__ import annotations

from typing import Callable

import torch

from cmt_core.time_grids import make_grid

DenoiserFn = Callable[..., torch.Tensor]


def _d(denoiser: DenoiserFn, x: torch.Tensor, t: torch.Tensor, labels) -> torch.Tensor:
    return denoiser(x, t.to(x.dtype).expand(x.shape[0]), labels)


def _b(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A grid time (scalar or ``(B,)``) broadcastable against ``x``."""
    return t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) if t.ndim else t.to(x.dtype)


@torch.no_grad()
def euler(denoiser: DenoiserFn, x: torch.Tensor, grid: torch.Tensor, labels=None) -> torch.Tensor:
    """First-order Euler: one denoiser call per step."""
    states = [x]
    for t, t_next in zip(grid[:-1], grid[1:]):
        d = (x - _d(denoiser, x, t, labels)) / _b(t, x)
        x = x + _b(t_next - t, x) * d
        states.append(x)
    return torch.stack(states, dim=1)


@torch.no_grad()
def heun(denoiser: DenoiserFn, x: torch.Tensor, grid: torch.Tensor, labels=None) -> torch.Tensor:
    """EDM's second-order Heun: two calls per step, one on a final step to sigma = 0."""
    states = [x]
    for t, t_next in zip(grid[:-1], grid[1:]):
        d = (x - _d(denoiser, x, t, labels)) / _b(t, x)
        x_euler = x + _b(t_next - t, x) * d
        if (t_next > 0).any():
            safe_next = t_next.clamp(min=1e-12)
            d_next = (x_euler - _d(denoiser, x_euler, safe_next, labels)) / _b(safe_next, x)
            x = torch.where(_b(t_next, x) > 0, x + _b(t_next - t, x) * (d + d_next) / 2, x_euler)
        else:
            x = x_euler
        states.append(x)
    return torch.stack(states, dim=1)


@torch.no_grad()
def dpm_solver_pp(denoiser: DenoiserFn, x: torch.Tensor, grid: torch.Tensor, labels=None, order: int = 2) -> torch.Tensor:
    """DPM-Solver++ multistep (order 2 or 3) in data prediction, one denoiser call per step.

    With lambda = -ln sigma and h = lambda_next - lambda, the exact solution of the linear part is
    x_next = (t_next / t) x + (1 - e^-h) D; the multistep correction adds phi_2 D' (+ phi_3 D'') from
    divided differences of the previous denoiser outputs (lower order at the first steps).
    """
    if order not in (2, 3):
        raise ValueError(f"order must be 2 or 3, got {order}")
    states, history, steps = [x], [], []  # history: previous denoised; steps: previous h
    for t, t_next in zip(grid[:-1], grid[1:]):
        denoised = _d(denoiser, x, t, labels)
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


def solve(denoiser: DenoiserFn, x: torch.Tensor, grid: torch.Tensor, name: str, labels=None) -> torch.Tensor:
    """Dispatch on the solver ``name`` ('euler' | 'heun' | 'dpm2m' | 'dpm3m')."""
    if name == "euler":
        return euler(denoiser, x, grid, labels)
    if name == "heun":
        return heun(denoiser, x, grid, labels)
    if name in ("dpm2m", "dpm3m"):
        return dpm_solver_pp(denoiser, x, grid, labels, order=int(name[3]))
    raise ValueError(f"unknown solver {name!r}; expected euler, heun, dpm2m or dpm3m")


def function_evaluations(name: str, grid: torch.Tensor) -> int:
    """Number of denoiser calls a solver makes on ``grid``."""
    steps = len(grid) - 1
    if name == "heun":
        return 2 * steps - int(grid[-1] == 0)
    return steps


def solve_config(denoiser: DenoiserFn, x: torch.Tensor, cfg, labels=None) -> torch.Tensor:
    """Solve on the grid of a ``SolverConfig``; ``x`` is the start state at ``cfg.sigma_max``."""
    return solve(denoiser, x, make_grid(cfg).to(x.device), cfg.name, labels)
