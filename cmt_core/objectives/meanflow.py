"""Mean Flow in EDM sigma time: the average velocity, its training target and its sampler, side by side.

A ``FlowMap`` f(x, t, s) = (s / t) x + (1 - s / t) D~(x, t, s) (``cmt_core.preconditioning``) read as Mean
Flow has the average velocity u(x_t, r, t) = (x_t - f(x_t, t, r)) / (t - r) = (x_t - D~(x_t, t, r)) / t
(``average_velocity``); at r = t it is the PF-ODE velocity. Sampling jumps x_r = x_t - (t - r) u(x_t, r, t)
= f(x_t, t, r) along a grid ending at 0 (``sample``); one step is x_0 = x_T - T u(x_T, 0, T).

Training: x_t = y + t e, so the conditional velocity is v = dx_t/dt = e. The average velocity over [r, t] obeys
u(x_t, r, t) = v - (t - r) d/dt u(x_t, r, t), the total derivative taken along the trajectory; it is one
forward-mode JVP with tangents (v, 0, 1) on (x_t, r, t). Target u_tgt = sg(v - (t - r) du/dt); loss
err / sg(err + norm_eps)^p (the adaptive weight), where err depends on ``time``:

* ``sigma``: err = ||u - u_tgt||^2 / dim, the per-dimension mean in sigma time.
* ``tau``: py-meanflow's loss (``meanflow/models/meanflow.py``) in its own time tau = t / (1 + t) in [0, 1),
  noise at tau = 1, converted at the edges: z = (1 - tau) x_t = (1 - tau) y + tau e, velocity V = e - y,
  U(z, tau_r, tau_t) = (1 + t) (u(x_t, r, t) - z) (``tau_velocity``), one JVP with tangents (V, 0, 1),
  err = ||U - sg(V - (tau_t - tau_r) dU/dtau_t)||^2 summed over dimensions. Written in sigma time this is
  (1 + t)^4 / (1 + r)^2 * dim times the ``sigma`` err, but its gradient is (1 + t)^3 / (1 + r) * dim times the
  ``sigma`` gradient (the stop-gradient target holds u itself in tau time): the two are different objectives
  with the same fixed point. Checked against py-meanflow's ``forward_with_loss`` on identical draws (float64):
  loss 6e-14, gradients 3e-13 relative.

Why ``tau``: the ``sigma`` err of a sample at large t is tiny (the velocity error is the jump's error divided
by t - r; a flow map mid-trained on digits: 2e-5 at t = 80, 7e-4 at t = 10, 0.2 at t = 1), below
norm_eps = 1e-3, so the adaptive weight stops normalising it and those samples train err / norm_eps times
less (0.02 at t = 80, 0.4 at t = 10). The ``tau`` err is 20 or more at every t, so every sample is normalised.

Times: ln t, ln r ~ N(p_mean, p_std^2), sorted so r <= t, and r = t for ``equal_fraction`` of the pairs;
py-meanflow's ``tr_sampler=v0``. A log-normal sigma is the logit-normal tau (logit tau = ln t; same draws give
the same times to 2e-16), so the Mean Flow paper's (-0.4, 1.0) carries over unchanged; py-meanflow's
``ratio`` (pairs with r != t) is 1 - ``equal_fraction``. Deviation: times are clamped to [sigma_min, sigma_max]
(tau in [0.002, 0.988]); the reference's tau runs over (0, 1).
Guidance in training (``omega``, ``kappa``, ``interval``; the Mean Flow paper's classifier-free guidance folded
into the target, as NVlabs/FastGen's ``MeanFlowModel._get_velocity`` writes it): for a sample that has a class
(a non-zero ``class_labels`` row) and whose tau_t lies in ``interval`` (closed), the velocity v of the target and
of the JVP's tangent becomes omega v + kappa u(x_t, t, t | c) + (1 - omega - kappa) u(x_t, t, t | no class), the
model's own instantaneous velocities, evaluated without gradients and with dropout off. Samples whose label the
training loop dropped (``train.label_dropout``: the all-zero row) keep v, and so train the unconditional branch
the guidance reads; so does every sample outside the interval. The weights sum to 1, so the mixture is the same in
sigma and in tau time. FastGen draws the number of dropped labels and takes them first in the batch; here the
batch's own dropped rows are those samples (the same rule, per sample). omega = 1, kappa = 0 is no guidance
(and no extra network call).
The batch's conditioning ``batch["cond"]`` goes to every network call (it is held fixed along the JVP).
``torch.func.jvp`` cannot run through a DDP wrapper: this objective sets ``uses_jvp`` and the training
loop hands it the bare module and all-reduces its gradients. An EDM2 network's forced weight normalisation is
applied once before the JVP and switched off inside it (``cmt_core.networks.edm2.apply_forced_weight_norm``): the
same weights as a training-mode pass, without the in-place write ``torch.func`` refuses.
"""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from cmt_core.conditioning import CLASS_LABELS, Cond
from cmt_core.guidance import unconditional
from cmt_core.networks.edm2 import apply_forced_weight_norm, forced_weight_norm
from cmt_core.objectives.distances import mean_squared_error, squared_l2
from cmt_core.preconditioning import as_batch, bcast

TIMES = ("sigma", "tau")


def average_velocity(flow_map, x: torch.Tensor, r, t, cond: Cond | None = None) -> torch.Tensor:
    """u(x_t, r, t) = (x_t - x_r) / (t - r) of a ``FlowMap``; ``x: (B, ...)``, ``r, t``: ``(B,)`` or floats."""
    t, r = as_batch(t, x), as_batch(r, x)
    return (x - flow_map.denoise(x, t, r, cond=cond)) / bcast(t, x)


def tau_velocity(flow_map, z: torch.Tensor, tau_r, tau_t, cond: Cond | None = None) -> torch.Tensor:
    """The average velocity in the reference's time tau = t / (1 + t) in [0, 1), where z = (1 - tau) x_t:
    U(z, tau_r, tau_t) = (z - z_r) / (tau_t - tau_r) = (1 + t) (u(x_t, r, t) - z), the same function of the
    ``FlowMap`` as ``average_velocity`` written in the other time (sigma-time arguments go in and out)."""
    tau_t, tau_r = as_batch(tau_t, z), as_batch(tau_r, z)
    scale = bcast(1 / (1 - tau_t), z)  # 1 + t
    return scale * (average_velocity(flow_map, scale * z, tau_r / (1 - tau_r), tau_t / (1 - tau_t), cond) - z)


@torch.no_grad()
def sample(flow_map, x_T: torch.Tensor, grid, cond: Cond | None = None) -> torch.Tensor:
    """Jumps x_r = x_t - (t - r) u(x_t, r, t), computed as f(x_t, t, r), along the decreasing ``grid``."""
    x = x_T
    for t, s in zip(grid[:-1], grid[1:]):
        x = flow_map(x, float(t), float(s), cond=cond)
    return x


class MeanFlowLoss:
    """``loss(flow_map, {"x": y, "cond"}, rng) -> (B,)``; settings as ``MeanFlowConfig`` names them."""

    uses_jvp = True

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, *, p_mean: float = -0.4,
                 p_std: float = 1.0, equal_fraction: float = 0.75, adaptive_p: float = 1.0, norm_eps: float = 1e-3,
                 time: str = "tau", omega: float = 1.0, kappa: float = 0.0, interval: tuple[float, float] = (0.0, 1.0)):
        if time not in TIMES:
            raise ValueError(f"time must be one of {TIMES}, got {time!r}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.p_mean, self.p_std, self.equal_fraction = p_mean, p_std, equal_fraction
        self.adaptive_p, self.norm_eps, self.time = adaptive_p, norm_eps, time
        self.omega, self.kappa, self.interval = float(omega), float(kappa), tuple(interval)

    def sample_times(self, rng) -> tuple[torch.Tensor, torch.Tensor]:
        a = (self.p_mean + self.p_std * rng.randn()).exp()
        b = (self.p_mean + self.p_std * rng.randn()).exp()
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        r = torch.where(rng.rand() < self.equal_fraction, t, r)
        return t.clamp(self.sigma_min, self.sigma_max), r.clamp(self.sigma_min, self.sigma_max)

    def __call__(self, flow_map, batch, rng) -> torch.Tensor:
        y, cond = batch["x"], batch.get("cond")
        t, r = self.sample_times(rng)
        e = rng.randn(*y.shape[1:])
        if flow_map.training:  # EDM2's forced weight normalisation once, outside the JVP (which refuses its write)
            apply_forced_weight_norm(flow_map)
        with forced_weight_norm(flow_map, False):
            return self._loss(flow_map, y, cond, t, r, e)

    def _loss(self, flow_map, y, cond, t, r, e) -> torch.Tensor:
        tau_t = t / (1 + t)
        if self.time == "tau":
            tau_r = r / (1 + r)
            z = (1 - bcast(tau_t, y)) * y + bcast(tau_t, y) * e
            u_fn = lambda z_, r_, t_: tau_velocity(flow_map, z_, r_, t_, cond)  # noqa: E731
            v = self.guided_velocity(flow_map, tau_velocity, z, tau_t, e - y, cond)
            u, target = meanflow_target(u_fn, z, tau_r, tau_t, v)
            err = squared_l2(u, target)
        else:
            x_t = y + bcast(t, y) * e
            u_fn = lambda x, r_, t_: average_velocity(flow_map, x, r_, t_, cond)  # noqa: E731
            v = self.guided_velocity(flow_map, average_velocity, x_t, t, e, cond, tau_t)
            u, target = meanflow_target(u_fn, x_t, r, t, v)
            err = mean_squared_error(u, target)
        return err / (err.detach() + self.norm_eps) ** self.adaptive_p

    def guided_velocity(self, flow_map, velocity, x: torch.Tensor, t: torch.Tensor, v: torch.Tensor,
                        cond: Cond | None, tau_t: torch.Tensor | None = None) -> torch.Tensor:
        """The velocity the target is built on (module docstring): ``v`` itself without guidance, else the guided
        mixture for the rows with a class and tau_t (``t`` when None, the tau-time loss) in ``interval``;
        ``velocity`` is ``tau_velocity`` or ``average_velocity`` (the time ``x``, ``t`` and ``v`` are in)."""
        labels = (cond or {}).get(CLASS_LABELS)
        if (self.omega == 1.0 and self.kappa == 0.0) or labels is None:
            return v
        tau_t = t if tau_t is None else tau_t
        guided = (labels != 0).any(dim=1) & (tau_t >= self.interval[0]) & (tau_t <= self.interval[1])
        if not guided.any():
            return v
        was_training = flow_map.training
        flow_map.eval()
        try:
            with torch.no_grad():
                u_uncond = velocity(flow_map, x, t, t, unconditional(cond))
                mixed = self.omega * v + (1 - self.omega - self.kappa) * u_uncond
                if self.kappa:
                    mixed = mixed + self.kappa * velocity(flow_map, x, t, t, cond)
        finally:
            flow_map.train(was_training)
        return torch.where(bcast(guided, v), mixed, v)


def meanflow_target(u_fn, x_t: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor):
    """``(u(x_t, r, t), sg(v - (t - r) du/dt))`` with du/dt the JVP along tangents (v, 0, 1). Attention runs as
    PyTorch's math kernel inside the JVP: the fused kernels (flash on CPU and CUDA, memory-efficient, cuDNN) have
    no forward-mode derivative (NVlabs/FastGen's Mean Flow does the same)."""
    with sdpa_kernel(SDPBackend.MATH):
        u, dudt = torch.func.jvp(u_fn, (x_t, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    return u, (v - bcast(t - r, x_t) * dudt).detach()
