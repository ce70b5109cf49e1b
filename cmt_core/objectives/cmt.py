"""Consistency mid-training: regress a few-step model onto teacher trajectories (no JVP, no stop-gradient).

Batches come from ``cmt_core.trajectories.pairs``: ``x_t`` at ``t`` and a later state ``x_s``
of the same solver trajectory at ``s < t``. With a per-sample distance d (``cmt_core.objectives.distances``):

* ``cm``:       d(f(x_t, t), x_s)  with x_s the clean end of the trajectory       (ConsistencyModel)
* ``flow_map``: d(f(x_t, t, s), x_s)                                              (FlowMap)
* ``mf``:       d(U(z_t, s, t), (z_t - z_s) / (tau_t - tau_s))                    (FlowMap)
  the paper's Mean Flow form, written as the paper and py-meanflow write Mean Flow: in the time
  tau = t / (1 + t) in [0, 1), where the state is z = (1 - tau) x and the flow map's average velocity is
  U = (z_t - (1 - tau_s) f(x_t, t, s)) / (tau_t - tau_s). Converted to our sigma time this is
  d((1 + t) f(x_t, t, s) / (t - s), (1 + t) x_s / (t - s)), which is how it is computed (through the
  module's forward, so a DDP wrapper sees the call); with the squared l2 distance it is
  (1 + t)^2 / (t - s)^2 ||f(x_t, t, s) - x_s||^2.
  Written in sigma time instead, d(u, (x_t - x_s) / (t - s)), i.e. ||f - x_s||^2 / (t - s)^2, it weights
  the 1-step jump 80 -> 0.002 about 1 / 6400 and a jump 0.003 -> 0.002 about 10^6, so long jumps barely train
  (digits, 4,000 steps, 1 / 2 steps: 59.8 / 12.9 FD-digits in sigma time, 17.1 / 11.1 in tau time,
  14.9 / 11.5 for ``flow_map``; 2 steps jump 80 -> 0.8 -> 0).

The reference (sony/cmt) trains the ``cm`` form with LPIPS by default, or the squared l2 distance / l2 norm,
unweighted: every trajectory point counts the same.
"""

import torch

from cmt_core.objectives.distances import Distance, squared_l2
from cmt_core.preconditioning import bcast

FORMS = ("cm", "mf", "flow_map")


class CMTLoss:
    """``loss(model, {"x_t", "t", "x_s", "s", "cond"}, rng) -> (B,)``; ``distance``: two ``(B, ...)`` batches ->
    ``(B,)``; ``cond``: the trajectory's conditioning (what the teacher solved it with), given to the model."""

    def __init__(self, form: str = "cm", distance: Distance = squared_l2):
        if form not in FORMS:
            raise ValueError(f"unknown CMT form {form!r}")
        self.form, self.distance = form, distance

    def __call__(self, model, batch, rng) -> torch.Tensor:
        x_t, t, x_s, s, cond = batch["x_t"], batch["t"], batch["x_s"], batch["s"], batch.get("cond")
        if self.form == "cm":
            return self.distance(model(x_t, t, cond=cond), x_s)
        if self.form == "flow_map":
            return self.distance(model(x_t, t, s, cond=cond), x_s)
        scale = bcast((1 + t) / (t - s), x_t)
        return self.distance(model(x_t, t, s, cond=cond) * scale, x_s * scale)
