"""Easy consistency tuning (ECT) and its distillation variant (ECD).

t = exp(N(p_mean, p_std^2)) (or log-uniform on [sigma_min, sigma_max]);
r = t (1 - (1 + k sigmoid(-b t)) / q^(stage + 1)) clamped at 0, with stage = start_stage + step // stage_steps,
so t - r shrinks as training goes on (a consistency model from mid-training starts at a later stage: its
first, large-dt stages would undo the mid-training). With shared noise e:
ECT: x_t = y + t e, x_r = y + r e;  ECD: x_r is one teacher solver step from x_t to r.
loss = d(f(x_t, t), sg f(x_r, r)) / (t - r), the target being x_r itself where r = 0 (ECT: y; ECD: the
teacher's step to 0, i.e. its denoised estimate); both passes use the same dropout mask.
As in the reference (locuslab/ect, ``ECMLoss``), d is per sample, over all its dimensions: the l2 norm
||f(x_t, t) - f(x_r, r)|| when ``huber_c = 0``, else pseudo-Huber sqrt(||.||^2 + c^2) - c with c = ``huber_c``.

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

import math

import torch

from cmt_core.config import ECTConfig
from cmt_core.objectives.distances import l2_norm, make_distance
from cmt_core.preconditioning import bcast
from cmt_core.solvers import solve


class ECTLoss:
    """``loss(consistency_model, {"x": y}, rng) -> (B,)``; pass ``teacher`` for ECD, ``anchor`` (the mid-trained
    model, not trained) for ``cfg.anchor_sigma`` > 0."""

    def __init__(self, cfg: ECTConfig, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 teacher=None, teacher_solver: str = "heun", anchor=None):
        if cfg.anchor_sigma > 0 and anchor is None:
            raise ValueError("ect.anchor_sigma > 0 needs the anchor model (a frozen copy of the mid-trained model)")
        self.cfg, self.sigma_min, self.sigma_max = cfg, sigma_min, sigma_max
        self.teacher, self.teacher_solver = teacher, teacher_solver
        self.anchor = anchor if cfg.anchor_sigma > 0 else None
        if self.anchor is not None:
            self.anchor.requires_grad_(False)
        self.distance = make_distance("pseudo_huber", cfg.huber_c) if cfg.huber_c > 0 else l2_norm

    def r_of_t(self, t: torch.Tensor, step: int) -> torch.Tensor:
        c = self.cfg
        decay = 1.0 / c.q ** (c.start_stage + step // c.stage_steps + 1)
        return (t * (1 - decay * (1 + c.k * torch.sigmoid(-c.b * t)))).clamp(min=0)

    def __call__(self, model, batch, rng) -> torch.Tensor:
        y, c = batch["x"], self.cfg
        if c.t_sampling == "log_uniform":
            log_min, log_max = math.log(self.sigma_min), math.log(self.sigma_max)
            t = (log_min + (log_max - log_min) * rng.rand()).exp()
        else:
            t = (c.p_mean + c.p_std * rng.randn()).exp().clamp(self.sigma_min, self.sigma_max)
        r = self.r_of_t(t, rng.step)
        noise = rng.randn(*y.shape[1:])
        x_t = y + bcast(t, y) * noise
        dropout_seed = rng.seed()
        with torch.no_grad():
            if self.teacher is not None:
                r = torch.where(r < self.sigma_min, torch.zeros_like(r), r)  # below the model's range: jump to 0
                x_r = solve(self.teacher, x_t, torch.stack([t, r]), self.teacher_solver)[:, -1]
            else:
                x_r = y + bcast(r, y) * noise
            torch.manual_seed(dropout_seed)
            target = torch.where(bcast(r, y) > 0, model(x_r, r.clamp(min=self.sigma_min)), x_r)
            if self.anchor is not None:  # the CMT boundary: in the model's mode, with the same dropout mask
                self.anchor.train(model.training)
                torch.manual_seed(dropout_seed)
                target = torch.where(bcast(t <= c.anchor_sigma, y), self.anchor(x_t, t), target)
        torch.manual_seed(dropout_seed)
        pred = model(x_t, t)
        return self.distance(pred, target) / (t - r)
