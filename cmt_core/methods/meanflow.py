"""Mean Flow (``cmt_core.objectives.meanflow``), a method of the ``posttrain`` stage training a two-time flow map.
Hyper-parameters in ``posttrain.meanflow``. Network evaluations per training sample: 2 (a forward-mode JVP)."""

from cmt_core.methods.registry import Method, register
from cmt_core.objectives.meanflow import MeanFlowLoss


def _loss(cfg, inputs):
    m = cfg.posttrain.meanflow
    return MeanFlowLoss(inputs.sigma_min, inputs.sigma_max, p_mean=m.p_mean, p_std=m.p_std,
                        equal_fraction=m.equal_fraction, adaptive_p=m.adaptive_p, norm_eps=m.norm_eps, time=m.time)


MEANFLOW = register(Method("meanflow", stage="posttrain", kind="flow_map",
                           section="posttrain.meanflow", build_loss=_loss, nfe=lambda cfg: 2, sampler="flow_map"))
