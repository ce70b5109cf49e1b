"""A post-training method from outside the package, declared and registered in this one file.

``cd_euler``: consistency distillation as Song et al. (2023) first wrote it. t is log-uniform over the model's
range, r = t / 2, x_r is one Euler step of the teacher's ODE from x_t = y + t e, and the loss is
||f(x_t, t) - sg f(x_r, r)||^2 (the target at the boundary: x_r itself). No hyper-parameters of its own.
"""

from __future__ import annotations

import math

import torch

from cmt_core.methods import Method, register
from cmt_core.preconditioning import bcast
from cmt_core.solvers import solve


class EulerDistillation:
    """``loss(consistency_model, {"x", "cond"}, rng) -> (B,)``."""

    def __init__(self, teacher, sigma_min: float, sigma_max: float):
        self.teacher, self.sigma_min, self.sigma_max = teacher, sigma_min, sigma_max

    def __call__(self, model, batch, rng) -> torch.Tensor:
        y, cond = batch["x"], batch.get("cond")
        log_min, log_max = math.log(2 * self.sigma_min), math.log(self.sigma_max)
        t = (log_min + (log_max - log_min) * rng.rand()).exp()
        r = t / 2
        x_t = y + bcast(t, y) * rng.randn(*y.shape[1:])
        with torch.no_grad():
            x_r = solve(self.teacher, x_t, torch.stack([t, r]), "euler", cond)[:, -1]
            target = model(x_r, r, cond=cond)
        return (model(x_t, t, cond=cond) - target).flatten(1).square().sum(1)


CD_EULER = register(Method(
    "cd_euler", stage="posttrain", kind="consistency", section=None,
    build_loss=lambda cfg, inputs: EulerDistillation(inputs.teacher, inputs.sigma_min, inputs.sigma_max),
    nfe=lambda cfg: 3, sampler="consistency", needs=("teacher",)))
