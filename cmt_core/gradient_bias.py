"""The paper's analysis, measured: how far a consistency objective's gradient is from the oracle's.

With an exact teacher (a 2-D Gaussian mixture, ``cmt_core.data.synthetic``) the true flow map Phi(x_t) (the ODE
endpoint at ``sigma_min``) is computable, so the *oracle* consistency loss is too. As in the paper's analysis the
distance is squared l2 and every time is weighted alike::

    L_oracle(theta) = mean_i E || f_theta(x_{t_i}, t_i) - Phi(x_{t_i}) ||^2,     x_{t_i} exact ODE states from x_T

over the 16 inner times ``t_i`` of the 16-step log-uniform grid (sigma_max -> sigma_min, ``TIMES``), with
``x_T = sigma_max z`` for fixed noises z. Two practical objectives replace Phi by something computable:

* **CMT**: the rollout solver's states and endpoint, ``|| f(xhat_{t_i}, t_i) - xhat_end ||^2``, from one solve of
  x_T with step size h = ln(sigma_max / sigma_min) / N (N a multiple of 16, so the 16-step grid's times are on
  it). Predicted bias O(eps + h^p) for a solver of order p and a teacher wrong by eps.
* **consistency distillation** (general CD): ``|| f(x_{t_i}, t_i) - sg f(x_u, u) ||^2`` with x_u reached from
  x_{t_i} by the teacher's Heun steps of size h down to an anchor u (every t_i above u); predicted
  O(eps + delta_u + h^2), delta_u = u - sigma_min the anchor's gap to the clean end (its target is the model
  itself at u, exact only at the boundary). ``cd_adjacent_gradient`` is the discrete-time form post-training
  uses (anchor: the next grid time), the one whose bias at initialisation compares CMT, diffusion and random
  weights.

``bias(...)`` is ``|| grad L_oracle - grad L ||`` (the l2 norm over all parameters, float64); its square is the
quantity the paper bounds, so the squared bias's slopes are twice the norm's. A perturbed teacher adds
``eps * tanh(x A + b)`` (a fixed smooth field) to the exact denoiser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cmt_core.solvers import solve
from cmt_core.teachers import ExactDenoiser
from cmt_core.time_grids import log_uniform_grid

COARSE_STEPS = 16  # the times the losses average over: the inner points of the 16-step grid
REFERENCE = ("dpm3m", 4096)  # the "exact" ODE solve: third order, 4,096 log-uniform steps, float64


class PerturbedDenoiser(nn.Module):
    """``D(x, t) + eps * tanh(x A + b)``: a teacher wrong by O(eps) everywhere (A, b fixed by ``seed``)."""

    def __init__(self, exact: nn.Module, eps: float, dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.exact, self.eps = exact, eps
        self.A = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        self.b = torch.randn(dim, generator=g, dtype=torch.float64)

    def forward(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        return self.exact(x, t, cond=cond) + self.eps * torch.tanh(x.double() @ self.A + self.b).to(x.dtype)


@dataclass
class Setup:
    """Noises, the exact trajectories at the coarse times and their exact endpoints (float64)."""

    distribution: object
    sigma_min: float
    sigma_max: float
    x_T: torch.Tensor  # (B, dim)
    times: torch.Tensor  # (16,) the coarse grid without its endpoint: sigma_max ... > sigma_min
    states: torch.Tensor  # (B, 16, dim) exact states at ``times``
    end: torch.Tensor  # (B, dim) exact endpoints Phi(x_T)


def make_setup(distribution, samples: int = 2048, sigma_min: float = 0.002, sigma_max: float = 80.0,
               seed: int = 0) -> Setup:
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(samples, 2, generator=g, dtype=torch.float64) * sigma_max
    name, steps = REFERENCE
    path = solve(ExactDenoiser(distribution), x_T, log_uniform_grid(steps, sigma_min, sigma_max), name)
    every = steps // COARSE_STEPS
    coarse = log_uniform_grid(COARSE_STEPS, sigma_min, sigma_max)
    return Setup(distribution, sigma_min, sigma_max, x_T, coarse[:-1], path[:, :-1:every], path[:, -1])


def step_size(setup: Setup, steps: int) -> float:
    """The log-sigma step h of an ``steps``-step log-uniform grid over [sigma_min, sigma_max]."""
    return math.log(setup.sigma_max / setup.sigma_min) / steps


def _loss(model: nn.Module, inputs: torch.Tensor, times: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Squared l2 per sample, averaged over samples and times. inputs/targets ``(B, T, dim)``, times ``(T,)``."""
    b, n, dim = inputs.shape
    t = times.to(inputs).repeat(b)
    out = model(inputs.reshape(b * n, dim), t)
    return (out - targets.reshape(b * n, dim)).pow(2).sum(-1).mean()


def _grad(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def oracle_gradient(model: nn.Module, setup: Setup, min_time: float = 0.0) -> torch.Tensor:
    """The oracle loss's gradient over the times above ``min_time`` (all by default; a CD anchor leaves fewer)."""
    keep = setup.times > min_time
    states = setup.states[:, keep]
    return _grad(model, _loss(model, states, setup.times[keep], setup.end[:, None].expand_as(states)))


def cmt_gradient(model: nn.Module, setup: Setup, solver: str, steps: int, eps: float = 0.0) -> torch.Tensor:
    """The CMT objective's gradient on one ``steps``-step solve of ``solver`` (teacher wrong by ``eps``)."""
    if steps % COARSE_STEPS:
        raise ValueError(f"steps must be a multiple of {COARSE_STEPS}, got {steps}")
    teacher = PerturbedDenoiser(ExactDenoiser(setup.distribution), eps, setup.x_T.shape[1])
    path = solve(teacher, setup.x_T, log_uniform_grid(steps, setup.sigma_min, setup.sigma_max), solver)
    every = steps // COARSE_STEPS
    inputs, end = path[:, :-1:every], path[:, -1]
    return _grad(model, _loss(model, inputs, setup.times, end[:, None].expand_as(inputs)))


def cd_gradient(model: nn.Module, setup: Setup, anchor: float, steps: int, eps: float = 0.0,
                min_time: float | None = None) -> torch.Tensor:
    """Consistency distillation to an anchor ``u = anchor``: targets ``f(x_u, u)`` (no gradient) with x_u from
    x_{t_i} by teacher Heun steps of log-size at most that of a ``steps``-step grid; times t_i > ``min_time``
    (default: the anchor)."""
    teacher = PerturbedDenoiser(ExactDenoiser(setup.distribution), eps, setup.x_T.shape[1])
    h = step_size(setup, steps)
    keep = setup.times > (anchor if min_time is None else min_time)
    inputs, times = setup.states[:, keep], setup.times[keep]
    targets = []
    for i, t in enumerate(times.tolist()):
        n = max(1, math.ceil(math.log(t / anchor) / h - 1e-9))
        x_u = solve(teacher, inputs[:, i], log_uniform_grid(n, anchor, t), "heun")[:, -1]
        with torch.no_grad():
            targets.append(model(x_u, torch.full((len(x_u),), anchor, dtype=x_u.dtype)))
    return _grad(model, _loss(model, inputs, times, torch.stack(targets, dim=1)))


def cd_adjacent_gradient(model: nn.Module, setup: Setup) -> torch.Tensor:
    """Discrete-time consistency distillation on the 16-step grid, as post-training runs it: the target of
    x_{t_i} is ``f(x', t_{i+1})`` (no gradient), x' one exact-teacher Heun step from x_{t_i} (at the last time
    the boundary: x' itself)."""
    grid = log_uniform_grid(COARSE_STEPS, setup.sigma_min, setup.sigma_max)
    teacher = ExactDenoiser(setup.distribution)
    targets = []
    for i in range(COARSE_STEPS):
        x_next = solve(teacher, setup.states[:, i], grid[i:i + 2], "heun")[:, -1]
        with torch.no_grad():
            targets.append(model(x_next, torch.full((len(x_next),), float(grid[i + 1]), dtype=x_next.dtype)))
    return _grad(model, _loss(model, setup.states, setup.times, torch.stack(targets, dim=1)))


def bias(g_oracle: torch.Tensor, g: torch.Tensor) -> float:
    """|| grad L_oracle - grad L || (its square is the paper's bias)."""
    return float((g_oracle - g).norm())


def fitted_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx = torch.tensor(xs, dtype=torch.float64).log()
    ly = torch.tensor(ys, dtype=torch.float64).log()
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return float((lx * ly).sum() / (lx * lx).sum())
