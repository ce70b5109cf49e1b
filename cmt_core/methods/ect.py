"""Easy consistency tuning (ECT) and its distillation variant (ECD), methods of the ``posttrain`` stage
(``cmt_core.objectives.ect``). Hyper-parameters in ``posttrain.ect`` (and ``posttrain.ecd_solver``, the teacher's
step of ECD).

Network evaluations per training sample: 2 (the student at t and its target at r), plus 1 for the CMT boundary's
frozen mid-trained model (``anchor_sigma`` > 0), plus ECD's teacher step (its solver's calls from t to r).
"""

from cmt_core.methods.registry import Method, get_method, register
from cmt_core.objectives.ect import ECTLoss
from cmt_core.solvers import function_evaluations
from cmt_core.time_grids import make_grid


def _loss(distill: bool):
    def build(cfg, inputs):
        p, e = cfg.posttrain, cfg.posttrain.ect
        anchor = inputs.midtrained() if e.anchor_sigma > 0 else None
        return ECTLoss(inputs.sigma_min, inputs.sigma_max, t_sampling=e.t_sampling, p_mean=e.p_mean, p_std=e.p_std,
                       k=e.k, b=e.b, q=e.q, stage_steps=e.stage_steps, start_stage=e.start_stage, huber_c=e.huber_c,
                       anchor_sigma=e.anchor_sigma, teacher=inputs.teacher if distill else None,
                       teacher_solver=p.ecd_solver, anchor=anchor, weighting=e.weighting,
                       sigma_data=inputs.sigma_data)
    return build


def _nfe(distill: bool):
    def nfe(cfg) -> int:
        anchor = int(cfg.posttrain.ect.anchor_sigma > 0)
        step = function_evaluations(cfg.posttrain.ecd_solver, make_grid(cfg.rollout.solver)[:2]) if distill else 0
        return 2 + anchor + step
    return nfe


def _rules(cfg) -> None:
    """The CMT boundary (``anchor_sigma`` > 0) keeps a mid-trained consistency model's map: it needs CMT weights
    and a method of this section."""
    anchor, p = cfg.posttrain.ect.anchor_sigma, cfg.posttrain
    if anchor > 0 and (p.init != "cmt" or get_method(p.method).section != "posttrain.ect"):
        raise ValueError(f"posttrain.ect.anchor_sigma={anchor} keeps the mid-trained model's map below it: it needs "
                         f"posttrain.init='cmt' and method 'ect' or 'ecd' (got init={p.init!r}, method={p.method!r}); "
                         "set it to 0")


ECT = register(Method("ect", stage="posttrain", kind="consistency", section="posttrain.ect",
                      build_loss=_loss(False), nfe=_nfe(False), sampler="consistency", needs=("midtrained",),
                      rules=_rules))
ECD = register(Method("ecd", stage="posttrain", kind="consistency", section="posttrain.ect",
                      build_loss=_loss(True), nfe=_nfe(True), sampler="consistency", needs=("teacher", "midtrained"),
                      rules=_rules))
