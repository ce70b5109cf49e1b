"""EDM preconditioning: the wrappers that own all sigma algebra around a raw network.

A raw network is ``F(x_in, c_noise: (B, n_times), cond=...) -> like x`` (``cmt_core.networks``); every wrapper
takes the conditioning channel ``cond`` (``cmt_core.conditioning``, None or empty when unconditional) as its last
argument, passed by keyword everywhere in the library, and hands it to the raw network unchanged.

* ``Denoiser``        D(x, t)    = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t))              (teacher)
* ``ConsistencyModel`` f(x, t)    = the same with the boundary form, so that f(x, sigma_min) = x exactly
* ``FlowMap``          f(x, t, s) = (s / t) x + (1 - s / t) D~(x, t, s),  D~ a two-time denoiser;
  so f(x, t, t) = x exactly, and a FlowMap initialised from a teacher's weights starts as the DDIM step
  of that teacher. Its Mean Flow reading (the average velocity u) is in ``cmt_core.objectives.meanflow``.
* ``VPDenoiser``       D(x, t)    = x - t F(x / sqrt(t^2 + 1), (M - 1) u(t)): EDM's VP preconditioning, for
  teachers trained with it (EDM's ``VPPrecond``);
* ``LinearVelocityDenoiser`` D(x, t) = z - tau V(z, tau), z = x / (1 + t), tau = t / (1 + t): a flow-matching
  velocity network (SiT) read in EDM time; ``make_denoiser`` builds any denoiser from its settings.

All times are EDM sigmas, ``(B,)`` tensors (a Python float is broadcast).
"""

from __future__ import annotations

import torch
from torch import nn

from cmt_core.conditioning import Cond

SIGMA_EMBED_MIN = 1e-3  # s = 0 (a jump to the data) is embedded as this sigma


def as_batch(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Time ``t`` (scalar or ``(B,)``) as a float ``(B,)`` tensor on ``x``'s device."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t.float()


def bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(B,)`` -> ``(B, 1, ..., 1)`` broadcastable against ``x``."""
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def c_noise(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(min=SIGMA_EMBED_MIN).log() / 4


def edm_scalings(t: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM's ``(c_skip, c_out, c_in)`` at ``t`` (already broadcast against x)."""
    sd = sigma_data
    return sd**2 / (t**2 + sd**2), t * sd / (t**2 + sd**2).sqrt(), 1 / (t**2 + sd**2).sqrt()


class Denoiser(nn.Module):
    """EDM denoiser ``D(x, t) -> x_0 estimate``; ``raw`` takes one time."""

    preconditioning = {"name": "edm"}  # what a model file records to rebuild this wrapper (``make_denoiser``)

    def __init__(self, raw: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.raw, self.sigma_data = raw, sigma_data

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond: Cond | None = None) -> torch.Tensor:
        t = as_batch(t, x)
        c_skip, c_out, c_in = edm_scalings(bcast(t, x), self.sigma_data)
        return c_skip * x + c_out * self.raw(c_in * x, c_noise(t)[:, None], cond=cond).to(x.dtype)


class VPDenoiser(nn.Module):
    """Denoiser ``D(x, t) -> x_0 estimate`` with EDM's VP preconditioning (``VPPrecond``; ``raw`` takes one time).

    ``c_skip = 1, c_out = -t, c_in = 1 / sqrt(t^2 + 1)``; the raw network is conditioned on ``(M - 1) u``
    (``M = num_steps``, the DDPM step count), where ``u`` in [0, 1] is the VP time at which the noise level
    is ``t``: ``u = (sqrt(beta_min^2 + 2 beta_d ln(1 + t^2)) - beta_min) / beta_d``, the inverse of
    ``t(u)^2 = exp(beta_d u^2 / 2 + beta_min u) - 1``.
    """

    def __init__(self, raw: nn.Module, beta_d: float = 19.9, beta_min: float = 0.1, num_steps: int = 1000):
        super().__init__()
        self.raw, self.beta_d, self.beta_min, self.num_steps = raw, beta_d, beta_min, num_steps
        self.preconditioning = {"name": "vp", "beta_d": beta_d, "beta_min": beta_min, "num_steps": num_steps}

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond: Cond | None = None) -> torch.Tensor:
        t = as_batch(t, x)
        u = ((self.beta_min**2 + 2 * self.beta_d * (1 + t**2).log()).sqrt() - self.beta_min) / self.beta_d
        tb = bcast(t, x)
        c_in = 1 / (tb**2 + 1).sqrt()
        return x - tb * self.raw(c_in * x, ((self.num_steps - 1) * u)[:, None], cond=cond).to(x.dtype)


LINEAR_TIMES = ("sit", "rf")
TIME_FEATURE_SCALE = 250.0  # the repository's Fourier features read c_noise * 250 (``cmt_core.networks.embedding``)


class LinearVelocityDenoiser(nn.Module):
    """Denoiser ``D(x, t) -> x_0 estimate`` of a flow-matching velocity network on the linear path (SiT's teachers,
    the Mean Flow papers' convention); ``raw`` takes one time.

    The linear path in its own time, two conventions (``time``):

    * ``sit`` (willisma/SiT, ``transport/path.py`` ``ICPlan``): x_s = s y + (1 - s) e with s in [0, 1], data at
      s = 1, and the network predicts v = dx_s/ds = y - e;
    * ``rf`` (py-meanflow, NVlabs/FastGen): z = (1 - tau) y + tau e with noise at tau = 1, and the network predicts
      V = dz/dtau = e - y.

    Converted exactly to EDM time: x_t = y + t e = (1 + t) z with tau = t / (1 + t) = 1 - s, so
    ``D(x, t) = z - tau V(z, tau) = z + tau v(z, 1 - tau)`` with z = x / (1 + t) (the posterior mean of y is affine
    in the posterior mean of the velocity, so the exact velocity gives the exact denoiser). The raw network is
    conditioned on its own time as DiT's and SiT's ``timestep_embedding(time)``: ``c_noise = time / 250``."""

    def __init__(self, raw: nn.Module, time: str = "sit"):
        super().__init__()
        if time not in LINEAR_TIMES:
            raise ValueError(f"the linear path's time must be one of {LINEAR_TIMES}, got {time!r}")
        self.raw, self.time = raw, time
        self.preconditioning = {"name": "linear_velocity", "time": time}

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond: Cond | None = None) -> torch.Tensor:
        t = as_batch(t, x)
        tau = t / (1 + t)
        z = x / bcast(1 + t, x)
        own = 1 - tau if self.time == "sit" else tau
        v = self.raw(z, (own / TIME_FEATURE_SCALE)[:, None], cond=cond).to(x.dtype)
        return z + bcast(tau, x) * v if self.time == "sit" else z - bcast(tau, x) * v


def make_denoiser(raw: nn.Module, sigma_data: float, preconditioning: dict | None = None) -> nn.Module:
    """The denoiser wrapper that ``preconditioning`` (a wrapper's ``preconditioning`` dict) names; None: EDM's."""
    settings = dict(preconditioning or Denoiser.preconditioning)
    name = settings.pop("name")
    if name == "edm":
        return Denoiser(raw, sigma_data, **settings)
    if name == "vp":
        return VPDenoiser(raw, **settings)
    if name == "linear_velocity":
        return LinearVelocityDenoiser(raw, **settings)
    raise ValueError(f"unknown denoiser preconditioning {name!r}; expected 'edm', 'vp' or 'linear_velocity'")


class ConsistencyModel(nn.Module):
    """Consistency function ``f(x, t) -> x_0`` with the boundary form (f(x, sigma_min) = x).

    ``boundary``: ``always`` uses the boundary form in training too; ``evaluation`` trains with EDM's scalings
    (c_skip = sd^2 / (t^2 + sd^2), c_out = t sd / sqrt(t^2 + sd^2)) and switches to the boundary form in eval
    mode, as ECT's and the CMT reference's ``ECMPrecond``: a teacher-initialised student then starts training
    as an exact copy of the teacher."""

    def __init__(self, raw: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002, boundary: str = "always"):
        super().__init__()
        if boundary not in ("always", "evaluation"):
            raise ValueError(f"boundary must be 'always' or 'evaluation', got {boundary!r}")
        self.raw, self.sigma_data, self.sigma_min, self.boundary = raw, sigma_data, sigma_min, boundary

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond: Cond | None = None) -> torch.Tensor:
        t = as_batch(t, x)
        sd, tb = self.sigma_data, bcast(t, x)
        if self.training and self.boundary == "evaluation":
            c_skip, c_out, c_in = edm_scalings(tb, sd)
        else:
            c_skip = sd**2 / ((tb - self.sigma_min) ** 2 + sd**2)
            c_out = (tb - self.sigma_min) * sd / (tb**2 + sd**2).sqrt()
            c_in = 1 / (tb**2 + sd**2).sqrt()
        return c_skip * x + c_out * self.raw(c_in * x, c_noise(t)[:, None], cond=cond).to(x.dtype)


class FlowMap(nn.Module):
    """Two-time flow map ``f(x, t, s) -> x_s``; ``raw`` takes two times.

    ``sigma_min``: the clean end of the training trajectories (the rollouts' last sigma). A target time s below
    it is *conditioned on* as ``sigma_min`` (the skip weight s / t keeps the true s), so the samplers' last jump
    to s = 0 asks the network for the jump it was trained on, to the trajectories' end: mid-training pairs and
    Mean Flow's times never go below ``sigma_min``, and ln(s) / 4 embeds 0 as ``SIGMA_EMBED_MIN``, an input the
    second time's embedding never saw (measured on digits, flow-map CMT, 1 step: FD 18.0 to s = 0 unclamped,
    14.9 clamped). None (files written before this existed): embed s as it is."""

    def __init__(self, raw: nn.Module, sigma_data: float = 0.5, sigma_min: float | None = None):
        super().__init__()
        self.raw, self.sigma_data, self.sigma_min = raw, sigma_data, sigma_min

    def denoise(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        """D~(x, t, s): the data estimate whose DDIM step t -> s is the flow map."""
        c_skip, c_out, c_in = edm_scalings(bcast(t, x), self.sigma_data)
        if self.sigma_min is not None:
            s = s.clamp(min=self.sigma_min)
        times = torch.stack([c_noise(t), c_noise(s)], dim=1)
        return c_skip * x + c_out * self.raw(c_in * x, times, cond=cond).to(x.dtype)

    def forward(self, x: torch.Tensor, t, s, cond: Cond | None = None) -> torch.Tensor:
        t, s = as_batch(t, x), as_batch(s, x)
        ratio = bcast(s / t, x)
        return ratio * x + (1 - ratio) * self.denoise(x, t, s, cond=cond)
