"""Consistency mid-training: regress a few-step model onto teacher trajectories (no JVP, no stop-gradient).

Batches come from ``cmt_core.trajectories.pairs``: ``x_t`` at ``t`` and a later state ``x_s``
of the same solver trajectory at ``s < t``.

* ``cm``:       d(f(x_t, t), x_s)  with x_s the clean end of the trajectory       (ConsistencyModel)
* ``flow_map``: d(f(x_t, t, s), x_s)                                              (FlowMap)
* ``mf``:       || u(x_t, s, t) - (x_t - x_s) / (t - s) ||^2                       (FlowMap)
  Since a FlowMap's velocity is u = (x_t - f(x_t, t, s)) / (t - s), this equals
  || f(x_t, t, s) - x_s ||^2 / (t - s)^2, which is how it is computed (through the module's forward,
  so a DDP wrapper sees the call).
"""

import torch

from cmt_core.objectives.base import distance, squared_l2


class CMTLoss:
    def __init__(self, form: str = "cm", distance_kind: str = "l2", huber_c: float = 0.0):
        if form not in ("cm", "flow_map", "mf"):
            raise ValueError(f"unknown CMT form {form!r}")
        self.form, self.distance_kind, self.huber_c = form, distance_kind, huber_c

    def __call__(self, model, batch, rng) -> torch.Tensor:
        x_t, t, x_s, s = batch["x_t"], batch["t"], batch["x_s"], batch["s"]
        if self.form == "cm":
            return distance(self.distance_kind, model(x_t, t), x_s, self.huber_c)
        if self.form == "flow_map":
            return distance(self.distance_kind, model(x_t, t, s), x_s, self.huber_c)
        return squared_l2(model(x_t, t, s), x_s) / (t - s) ** 2
