"""Consistency mid-training: regress a few-step model onto teacher trajectories (no JVP, no stop-gradient).

Batches come from ``cmt_core.trajectories.pairs``: ``x_t`` at ``t`` and a later state ``x_s``
of the same solver trajectory at ``s < t``. With a per-sample distance d (``cmt_core.objectives.distances``):

* ``cm``:       d(f(x_t, t), x_s)  with x_s the clean end of the trajectory       (ConsistencyModel)
* ``flow_map``: d(f(x_t, t, s), x_s)                                              (FlowMap)
* ``mf``:       d(u(x_t, s, t), (x_t - x_s) / (t - s))                            (FlowMap)
  Since a FlowMap's velocity is u = (x_t - f(x_t, t, s)) / (t - s), this is d(f(x_t, t, s) / (t - s),
  x_s / (t - s)), which is how it is computed (through the module's forward, so a DDP wrapper sees the call);
  with the squared l2 distance it is ||f(x_t, t, s) - x_s||^2 / (t - s)^2.

The reference (sony/cmt) trains the ``cm`` form with LPIPS by default, or the squared l2 distance / l2 norm,
unweighted: every trajectory point counts the same.
"""

import torch

from cmt_core.objectives.distances import Distance, squared_l2
from cmt_core.preconditioning import bcast


class CMTLoss:
    """``loss(model, {"x_t", "t", "x_s", "s"}, rng) -> (B,)``; ``distance``: two ``(B, ...)`` batches -> ``(B,)``."""

    def __init__(self, form: str = "cm", distance: Distance = squared_l2):
        if form not in ("cm", "flow_map", "mf"):
            raise ValueError(f"unknown CMT form {form!r}")
        self.form, self.distance = form, distance

    def __call__(self, model, batch, rng) -> torch.Tensor:
        x_t, t, x_s, s = batch["x_t"], batch["t"], batch["x_s"], batch["s"]
        if self.form == "cm":
            return self.distance(model(x_t, t), x_s)
        if self.form == "flow_map":
            return self.distance(model(x_t, t, s), x_s)
        dt = bcast(t - s, x_t)
        return self.distance(model(x_t, t, s) / dt, x_s / dt)
