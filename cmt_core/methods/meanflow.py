"""Mean Flow (``cmt_core.objectives.meanflow``), a method of the ``posttrain`` stage training a two-time flow map.
Hyper-parameters in ``posttrain.meanflow``. Network evaluations per training sample: 2 (a forward-mode JVP), plus
1 (omega) or 2 (kappa > 0) without gradients with guidance in the target."""

from cmt_core.methods.registry import Method, register
from cmt_core.objectives.meanflow import MeanFlowLoss


def _loss(cfg, inputs):
    m = cfg.posttrain.meanflow
    g = m.guidance
    return MeanFlowLoss(inputs.sigma_min, inputs.sigma_max, p_mean=m.p_mean, p_std=m.p_std,
                        equal_fraction=m.equal_fraction, adaptive_p=m.adaptive_p, norm_eps=m.norm_eps, time=m.time,
                        omega=g.omega, kappa=g.kappa, interval=(g.t_start, g.t_end))


def _nfe(cfg) -> int:
    g = cfg.posttrain.meanflow.guidance
    return 2 + (1 if g.active else 0) + (1 if g.kappa else 0)


def _rules(cfg) -> None:
    """Guidance in the target reads the model's unconditional branch: it needs classes, label dropout to train
    that branch, and this method."""
    g, p = cfg.posttrain.meanflow.guidance, cfg.posttrain
    if not g.active:
        return
    what = f"posttrain.meanflow.guidance (omega={g.omega}, kappa={g.kappa})"
    if p.method != "meanflow":
        raise ValueError(f"{what} guides Mean Flow's target: it needs posttrain.method='meanflow', not {p.method!r}")
    if not cfg.data.num_classes:
        raise ValueError(f"{what} mixes class-conditional and unconditional velocities: it needs data.num_classes > 0")
    if not p.train.label_dropout:
        raise ValueError(f"{what} reads the model's unconditional branch: posttrain.train.label_dropout must be > 0 "
                         "to train it (the Mean Flow paper: 0.1)")


MEANFLOW = register(Method("meanflow", stage="posttrain", kind="flow_map", section="posttrain.meanflow",
                           build_loss=_loss, nfe=_nfe, sampler="flow_map", rules=_rules))
