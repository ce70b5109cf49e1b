"""Deterministic solvers of the probability-flow ODE ``dx/dt = (x - D(x, t)) / t`` (EDM sigma time).

Each solver is a pure function of (denoiser, start state, grid) and returns the whole trajectory
``(B, N + 1, *sample_shape)``: index 0 is the start ``x_{t_0}`` (noise end), index N the end of the grid.
``denoiser(x, t: (B,), cond=cond) -> x_0 estimate``; ``cond`` (``cmt_core.conditioning``: each row's conditioning,
or None) is handed to every denoiser call. The grid is decreasing, ``(N + 1,)`` shared by the batch or ``(N + 1,
B)`` per sample; a final sigma = 0 is allowed (the step then returns the denoiser's estimate, as EDM's Heun sampler
does).

``SOLVERS`` registers every solver once (name -> function, its number of denoiser calls and the keyword
options it takes); the configs' solver choices (``cmt_core.config.SolverName``) are its keys. A new solver
is one function and one entry. ``dpm2m`` / ``dpm3m`` are DPM-Solver++ multistep of orders 2 and 3 (Lu et al.
2022, data prediction; the third-order step weights the second divided difference as the Taylor expansion
does). ``dpm2m_taylor`` uses DPM-Solver's "taylor" second-order update instead; ``dpm3m_lu`` is the third-order
multistep update exactly as DPM-Solver's released code (and the reference, sony/cmt) computes it, which
carries half that weight and so converges at second order (see ``_multistep_correction``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cmt_core.conditioning import Cond
from cmt_core.time_grids import make_grid

DenoiserFn = Callable[..., torch.Tensor]


def _d(denoiser: DenoiserFn, x: torch.Tensor, t: torch.Tensor, cond: Cond | None) -> torch.Tensor:
    return denoiser(x, t.to(x.dtype).expand(x.shape[0]), cond=cond)


def _b(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A grid time (scalar or ``(B,)``) broadcastable against ``x``."""
    return t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) if t.ndim else t.to(x.dtype)


def _euler_step(denoiser: DenoiserFn, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, cond: Cond | None):
    """``(x_next, d)``: one Euler step along the ODE's velocity ``d = (x - D(x, t)) / t``."""
    d = (x - _d(denoiser, x, t, cond)) / _b(t, x)
    return x + _b(t_next - t, x) * d, d


@torch.no_grad()
def euler(denoiser: DenoiserFn, x: torch.Tensor, grid: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
    """First-order Euler: one denoiser call per step."""
    states = [x]
    for t, t_next in zip(grid[:-1], grid[1:]):
        x, _ = _euler_step(denoiser, x, t, t_next, cond)
        states.append(x)
    return torch.stack(states, dim=1)


@torch.no_grad()
def heun(denoiser: DenoiserFn, x: torch.Tensor, grid: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
    """EDM's second-order Heun: two calls per step, one on a final step to sigma = 0."""
    states = [x]
    for t, t_next in zip(grid[:-1], grid[1:]):
        x_euler, d = _euler_step(denoiser, x, t, t_next, cond)
        if (t_next > 0).any():
            safe_next = t_next.clamp(min=1e-12)
            d_next = (x_euler - _d(denoiser, x_euler, safe_next, cond)) / _b(safe_next, x)
            x = torch.where(_b(t_next, x) > 0, x + _b(t_next - t, x) * (d + d_next) / 2, x_euler)
        else:
            x = x_euler
        states.append(x)
    return torch.stack(states, dim=1)


def _step_orders(steps: int, order: int, lower_order_final: bool) -> list[int]:
    """The order of each of ``steps`` multistep updates.

    Step i (0-based) has only i previous denoiser outputs, so its order is at most i + 1; with
    ``lower_order_final`` the last steps also come down to ..., 3, 2, 1 (order at most ``steps - i``), as in
    DPM-Solver's sampler, which does so below 10 steps and the reference at any number (16 steps of order 3:
    1, 2, 3 x 12, 2, 1)."""
    return [min(order, i + 1, steps - i if lower_order_final else order) for i in range(steps)]


def _multistep_correction(denoised: torch.Tensor, history: list[torch.Tensor], h: torch.Tensor,
                          h_history: list[torch.Tensor], order: int, taylor: bool, lu_code: bool) -> torch.Tensor:
    """The terms of order 2 (and 3) added to the first-order update ``(t_next / t) x - (e^-h - 1) D_i``.

    ``history``: the previous denoiser outputs ``[..., D_{i-2}, D_{i-1}]``; ``h_history``: the steps that
    ended at their successors ``[..., h_{i-2}, h_{i-1}]``; ``r_k = h_{i-1-k} / h``. Order 2:
    ``-(e^-h - 1) / 2 * (D_i - D_{i-1}) / r_0`` (Lu et al.'s DPM-Solver++(2M)), or with ``taylor``
    ``phi_2 (D_i - D_{i-1}) / r_0``, ``phi_2 = (e^-h - 1) / h + 1``, the exact integral of the linearly
    extrapolated D (DPM-Solver's "taylor" solver type; less accurate on our exact teachers). Order 3:
    ``phi_2 D1 - 2 phi_3 D2``, ``phi_3 = phi_2 / h - 1/2``, with ``D1 ~ h D'`` and ``D2 ~ h^2 D'' / 2`` from the
    last three outputs: the exact integral of the quadratically extrapolated D, so each step errs by O(h^4)
    and the solver converges at third order. ``lu_code``: ``phi_2 D1 - phi_3 D2``, DPM-Solver's released
    multistep update (its singlestep third-order update has the factor 2), which the reference runs; each step
    then errs by ~h^3 D'' / 12 and the solver converges at second order once the steps are fine.
    """
    phi_1 = torch.expm1(-h)
    r0 = h_history[-1] / h
    d1_0 = (denoised - history[-1]) / r0
    if order == 2:
        return (phi_1 / h + 1) * d1_0 if taylor else -0.5 * phi_1 * d1_0
    r1 = h_history[-2] / h
    d1_1 = (history[-1] - history[-2]) / r1
    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi_2 = phi_1 / h + 1
    return phi_2 * d1 - (1 if lu_code else 2) * (phi_2 / h - 0.5) * d2


@torch.no_grad()
def dpm_solver_pp(denoiser: DenoiserFn, x: torch.Tensor, grid: torch.Tensor, cond: Cond | None = None,
                  order: int = 2, *, lower_order_final: bool = False, taylor: bool = False,
                  lu_code: bool = False) -> torch.Tensor:
    """DPM-Solver++ multistep of Lu et al. 2022 (order 2 or 3, data prediction), one denoiser call per step.

    EDM time: alpha = 1, sigma = t, lambda = -ln t, h = ln(t / t_next). Step i goes from ``t_i`` to
    ``t_{i+1}`` with ``D_i = D(x_i, t_i)``: the first-order update ``(t_next / t) x - (e^-h - 1) D_i`` is
    exact for a constant D; the multistep corrections (``_multistep_correction``) extrapolate D from the
    previous outputs. Orders per step: ``_step_orders`` (lower at the first steps, and at the last ones
    with ``lower_order_final``). ``taylor``: DPM-Solver's "taylor" second-order update instead of the
    standard one; ``lu_code``: the third-order update as DPM-Solver's code writes it (half the D2 weight).
    A step to sigma = 0 (h = inf) is first order and lands on D_i; the corrections diverge
    there, so per-sample grids may reach 0 only on a first-order step or all at once.
    """
    if order not in (2, 3):
        raise ValueError(f"order must be 2 or 3, got {order}")
    orders = _step_orders(len(grid) - 1, order, lower_order_final)
    states, history, h_history = [x], [], []  # previous denoiser outputs and steps, newest last
    for t, t_next, step_order in zip(grid[:-1], grid[1:], orders):
        denoised = _d(denoiser, x, t, cond)
        if (t_next == 0).all():
            x = denoised
        else:
            to_zero = _b(t_next, x) == 0
            if to_zero.any() and step_order > 1:
                raise ValueError("DPM-Solver++ multistep needs a grid that reaches sigma = 0 for all samples at "
                                 "once or on a first-order step")
            h = _b(torch.log(t / t_next.clamp(min=1e-12)), x)
            x = _b(t_next / t, x) * x - torch.expm1(-h) * denoised
            if step_order > 1:
                x = x + _multistep_correction(denoised, history, h, h_history, step_order, taylor, lu_code)
            x = torch.where(to_zero, denoised, x)
            h_history = (h_history + [h])[-2:]
        history = (history + [denoised])[-2:]
        states.append(x)
    return torch.stack(states, dim=1)


def _one_call_per_step(grid: torch.Tensor) -> int:
    return len(grid) - 1


def _heun_calls(grid: torch.Tensor) -> int:
    return 2 * (len(grid) - 1) - int(grid[-1] == 0)


@dataclass(frozen=True)
class Solver:
    run: Callable[..., torch.Tensor]  # (denoiser, x, grid, cond, **options) -> states (B, N + 1, *sample_shape)
    function_evaluations: Callable[[torch.Tensor], int]  # grid -> denoiser calls
    options: frozenset[str] = frozenset()  # the keyword options ``run`` takes


_MULTISTEP_OPTIONS = frozenset({"lower_order_final"})

SOLVERS: dict[str, Solver] = {
    "euler": Solver(euler, _one_call_per_step),
    "heun": Solver(heun, _heun_calls),
    "dpm2m": Solver(functools.partial(dpm_solver_pp, order=2), _one_call_per_step, _MULTISTEP_OPTIONS),
    "dpm3m": Solver(functools.partial(dpm_solver_pp, order=3), _one_call_per_step, _MULTISTEP_OPTIONS),
    "dpm2m_taylor": Solver(functools.partial(dpm_solver_pp, order=2, taylor=True), _one_call_per_step,
                           _MULTISTEP_OPTIONS),
    "dpm3m_lu": Solver(functools.partial(dpm_solver_pp, order=3, lu_code=True), _one_call_per_step,
                       _MULTISTEP_OPTIONS),
}


def get_solver(name: str) -> Solver:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; expected one of {sorted(SOLVERS)}")
    return SOLVERS[name]


def solve(denoiser: DenoiserFn, x: torch.Tensor, grid: torch.Tensor, name: str, cond: Cond | None = None,
          **options) -> torch.Tensor:
    """The trajectory ``(B, N + 1, *sample_shape)`` of the registered solver ``name`` on ``grid``; ``cond``: the
    rows' conditioning, handed to every denoiser call.

    ``options``: keywords the solver declares (``Solver.options``), e.g. ``lower_order_final=True`` for
    the multistep DPM-Solver++ variants; any other is an error rather than silently ignored."""
    solver = get_solver(name)
    if unknown := set(options) - solver.options:
        raise ValueError(f"solver {name!r} takes no option {sorted(unknown)}; it takes {sorted(solver.options)}")
    return solver.run(denoiser, x, grid, cond, **options)


def function_evaluations(name: str, grid: torch.Tensor) -> int:
    """Number of denoiser calls the solver ``name`` makes on ``grid``."""
    return get_solver(name).function_evaluations(grid)


def solve_config(denoiser: DenoiserFn, x: torch.Tensor, cfg, cond: Cond | None = None) -> torch.Tensor:
    """Solve on the grid of a ``SolverConfig`` (read as plain values: name, grid, steps, sigmas, ...); ``x`` is
    the start state at ``cfg.sigma_max``.

    ``cfg.lower_order_final`` is passed only when set, so solvers without that option run with the default."""
    options = {"lower_order_final": True} if cfg.lower_order_final else {}
    return solve(denoiser, x, make_grid(cfg).to(x.device), cfg.name, cond, **options)
