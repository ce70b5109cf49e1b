"""Easy consistency tuning (ECT) and its distillation variant (ECD).

t = exp(N(p_mean, p_std^2)) (or log-uniform on [sigma_min, sigma_max]);
r = t (1 - (1 + k sigmoid(-b t)) / q^(stage + 1)) clamped at 0, with stage = start_stage + step // stage_steps,
so t - r shrinks as training goes on (a consistency model from mid-training starts at a later stage: its
first, large-dt stages would undo the mid-training). With shared noise e:
ECT: x_t = y + t e, x_r = y + r e;  ECD: x_r is one teacher solver step from x_t to r.
loss = w(t, r) d(f(x_t, t), sg f(x_r, r)), the target being x_r itself where r = 0 (ECT: y; ECD: the
teacher's step to 0, i.e. its denoised estimate); both passes use the same dropout mask. The weight
(``weighting``): ``inverse_dt`` 1 / (t - r), ECT's and the reference's CIFAR-10 / FFHQ / AFHQ losses; ``snr_plus_k``
(t^2 + sigma_data^2) / (t sigma_data)^2 = 1 / t^2 + 1 / sigma_data^2, the reference's ImageNet-512 ECT / ECD
losses (sony/cmt ``imagenet512/training/loss.py``, ``wt='snrpk'``).
As in the reference (locuslab/ect, ``ECMLoss``), d is per sample, over all its dimensions: the l2 norm
||f(x_t, t) - f(x_r, r)|| when ``huber_c = 0``, else pseudo-Huber sqrt(||.||^2 + c^2) - c with c = ``huber_c``.
Every network call (and ECD's teacher step) gets the batch's conditioning ``batch["cond"]``; a guided teacher
(``cmt_core.guidance``) makes ECD's teacher step guided, as the reference's ImageNet-512 ECD (``ECDGuidLoss``).
The student pass runs first and the target pass after it with EDM2's forced weight normalisation switched off
(``forced_weight_norm``), as the reference's ``disable_forced_wn``: the student pass has just normalised the
weights, and normalising them again would give the target slightly different ones.

The CMT boundary (``anchor_sigma`` > 0, with ``anchor`` a frozen copy of the mid-trained model; a deliberate
deviation from ECT, off by default and in the paper's recipes): for t <= anchor_sigma the target is
sg anchor(x_t, t) instead of sg f(x_r, r). ECT pins a consistency function by its boundary f(x, sigma_min) = x
and propagates it upward by self-consistency; a mid-trained model is already a good consistency function at low
and moderate noise (its regression targets there are a few solver steps away) and weak at large noise, so the
boundary moves to [sigma_min, anchor_sigma] and holds the mid-trained map, and consistency tuning above it
propagates that map to large t. Measured on digits (ECD from CMT, seed 0, 2,000 steps, 4 noise sets, FD-digits
1-step / 2-step at sigma 0.6): without it 10.72 / 10.56, the small-noise map degrading under tuning (its FD on
re-noised data 8.5 -> 9.8 at t = 0.6, for any lr down to 1e-5) while the 1-step improves; with anchor_sigma 1.0:
9.83 / 8.69 (the mid-trained start: 13.95 / 10.30).
"""

import functools
import math

import torch

from cmt_core.networks.edm2 import forced_weight_norm
from cmt_core.objectives.distances import l2_norm, pseudo_huber
from cmt_core.preconditioning import bcast
from cmt_core.solvers import solve

WEIGHTINGS = {
    "inverse_dt": lambda t, r, sigma_data: 1 / (t - r),
    "snr_plus_k": lambda t, r, sigma_data: (t**2 + sigma_data**2) / (t * sigma_data) ** 2,
}


class ECTLoss:
    """``loss(consistency_model, {"x": y, "cond"}, rng) -> (B,)``; pass ``teacher`` for ECD, ``anchor`` (the
    mid-trained model, not trained) for ``anchor_sigma`` > 0. Settings as ``ECTConfig`` names them."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, *, t_sampling: str = "lognormal",
                 p_mean: float = -1.1, p_std: float = 2.0, k: float = 8.0, b: float = 1.0, q: float = 2.0,
                 stage_steps: int = 1000, start_stage: int = 0, huber_c: float = 0.0, anchor_sigma: float = 0.0,
                 teacher=None, teacher_solver: str = "heun", anchor=None, weighting: str = "inverse_dt",
                 sigma_data: float = 0.5):
        if t_sampling not in ("lognormal", "log_uniform"):
            raise ValueError(f"t_sampling must be 'lognormal' or 'log_uniform', got {t_sampling!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {sorted(WEIGHTINGS)}, got {weighting!r}")
        if anchor_sigma > 0 and anchor is None:
            raise ValueError("ect.anchor_sigma > 0 needs the anchor model (a frozen copy of the mid-trained model)")
        self.sigma_min, self.sigma_max, self.t_sampling = sigma_min, sigma_max, t_sampling
        self.p_mean, self.p_std, self.k, self.b, self.q = p_mean, p_std, k, b, q
        self.stage_steps, self.start_stage, self.anchor_sigma = stage_steps, start_stage, anchor_sigma
        self.teacher, self.teacher_solver = teacher, teacher_solver
        self.anchor = anchor if anchor_sigma > 0 else None
        if self.anchor is not None:
            self.anchor.requires_grad_(False)
        self.distance = functools.partial(pseudo_huber, c=huber_c) if huber_c > 0 else l2_norm
        self.weight = functools.partial(WEIGHTINGS[weighting], sigma_data=sigma_data)

    def r_of_t(self, t: torch.Tensor, step: int) -> torch.Tensor:
        decay = 1.0 / self.q ** (self.start_stage + step // self.stage_steps + 1)
        return (t * (1 - decay * (1 + self.k * torch.sigmoid(-self.b * t)))).clamp(min=0)

    def __call__(self, model, batch, rng) -> torch.Tensor:
        y, cond = batch["x"], batch.get("cond")
        if self.t_sampling == "log_uniform":
            log_min, log_max = math.log(self.sigma_min), math.log(self.sigma_max)
            t = (log_min + (log_max - log_min) * rng.rand()).exp()
        else:
            t = (self.p_mean + self.p_std * rng.randn()).exp().clamp(self.sigma_min, self.sigma_max)
        r = self.r_of_t(t, rng.step)
        noise = rng.randn(*y.shape[1:])
        x_t = y + bcast(t, y) * noise
        dropout_seed = rng.seed()
        torch.manual_seed(dropout_seed)
        pred = model(x_t, t, cond=cond)  # first: a training-mode pass applies EDM2's forced weight normalisation
        with torch.no_grad():
            if self.teacher is not None:
                r = torch.where(r < self.sigma_min, torch.zeros_like(r), r)  # below the model's range: jump to 0
                x_r = solve(self.teacher, x_t, torch.stack([t, r]), self.teacher_solver, cond)[:, -1]
            else:
                x_r = y + bcast(r, y) * noise
            torch.manual_seed(dropout_seed)
            with forced_weight_norm(model, False):  # the weights the student pass used, not normalised again
                target = torch.where(bcast(r, y) > 0, model(x_r, r.clamp(min=self.sigma_min), cond=cond), x_r)
            if self.anchor is not None:  # the CMT boundary: in the model's mode, with the same dropout mask
                self.anchor.train(model.training)
                torch.manual_seed(dropout_seed)
                target = torch.where(bcast(t <= self.anchor_sigma, y), self.anchor(x_t, t, cond=cond), target)
        return self.distance(pred, target) * self.weight(t, r)
