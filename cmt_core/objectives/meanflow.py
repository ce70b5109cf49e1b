"""Mean Flow in EDM sigma time: the average velocity, its training target and its sampler, side by side.

A ``FlowMap`` f(x, t, s) = (s / t) x + (1 - s / t) D~(x, t, s) (``cmt_core.preconditioning``) read as Mean
Flow has the average velocity u(x_t, r, t) = (x_t - f(x_t, t, r)) / (t - r) = (x_t - D~(x_t, t, r)) / t
(``average_velocity``); at r = t it is the PF-ODE velocity. Sampling jumps x_r = x_t - (t - r) u(x_t, r, t)
= f(x_t, t, r) along a grid ending at 0 (``sample``); one step is x_0 = x_T - T u(x_T, 0, T).

Training: x_t = y + t e, so the conditional velocity is v = dx_t/dt = e. The average velocity over [r, t] obeys
u(x_t, r, t) = v - (t - r) d/dt u(x_t, r, t), the total derivative taken along the trajectory; it is one
forward-mode JVP with tangents (v, 0, 1) on (x_t, r, t). Target u_tgt = sg(v - (t - r) du/dt); loss
w * e with e = ||u - u_tgt||^2 / dim (the per-dimension mean) and the adaptive weight w = sg(1 / (e + 1e-3)^p).

Times: ln t, ln r ~ N(p_mean, p_std^2), sorted so r <= t, and r = t for ``equal_fraction`` of the pairs.
A log-normal sigma is the Mean Flow paper's logit-normal time tau = t / (1 + t) (logit tau = ln t), so
its (-0.4, 1.0) recipe carries over unchanged; its "25% of pairs with r != t" is ``equal_fraction=0.75``.
``torch.func.jvp`` cannot run through a DDP wrapper: this objective sets ``uses_jvp`` and the training
loop hands it the bare module and all-reduces its gradients.
"""

import torch

from cmt_core.config import MeanFlowConfig
from cmt_core.objectives.distances import mean_squared_error
from cmt_core.preconditioning import as_batch, bcast


def average_velocity(flow_map, x: torch.Tensor, r, t) -> torch.Tensor:
    """u(x_t, r, t) = (x_t - x_r) / (t - r) of a ``FlowMap``; ``x: (B, ...)``, ``r, t``: ``(B,)`` or floats."""
    t, r = as_batch(t, x), as_batch(r, x)
    return (x - flow_map.denoise(x, t, r)) / bcast(t, x)


@torch.no_grad()
def sample(flow_map, x_T: torch.Tensor, grid) -> torch.Tensor:
    """Jumps x_r = x_t - (t - r) u(x_t, r, t), computed as f(x_t, t, r), along the decreasing ``grid``."""
    x = x_T
    for t, s in zip(grid[:-1], grid[1:]):
        x = flow_map(x, float(t), float(s))
    return x


class MeanFlowLoss:
    uses_jvp = True

    def __init__(self, cfg: MeanFlowConfig, sigma_min: float = 0.002, sigma_max: float = 80.0, eps: float = 1e-3):
        self.cfg, self.sigma_min, self.sigma_max, self.eps = cfg, sigma_min, sigma_max, eps

    def sample_times(self, rng) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        a = (c.p_mean + c.p_std * rng.randn()).exp()
        b = (c.p_mean + c.p_std * rng.randn()).exp()
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        r = torch.where(rng.rand() < c.equal_fraction, t, r)
        return t.clamp(self.sigma_min, self.sigma_max), r.clamp(self.sigma_min, self.sigma_max)

    def __call__(self, flow_map, batch, rng) -> torch.Tensor:
        y = batch["x"]
        t, r = self.sample_times(rng)
        v = rng.randn(*y.shape[1:])
        u_fn = lambda x, r_, t_: average_velocity(flow_map, x, r_, t_)  # noqa: E731
        u, target = meanflow_target(u_fn, y + bcast(t, y) * v, r, t, v)
        err = mean_squared_error(u, target)
        return err / (err.detach() + self.eps) ** self.cfg.adaptive_p


def meanflow_target(u_fn, x_t: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor):
    """``(u(x_t, r, t), sg(v - (t - r) du/dt))`` with du/dt the JVP along tangents (v, 0, 1)."""
    u, dudt = torch.func.jvp(u_fn, (x_t, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    return u, (v - bcast(t - r, x_t) * dudt).detach()
