"""The teacher's objective: EDM denoising (``cmt_core.objectives.edm``), with its hyper-parameters in ``teacher``
(``p_mean``, ``p_std``) and ``network.sigma_data``. One network evaluation per training sample."""

from cmt_core.methods.registry import Method, register
from cmt_core.objectives.edm import EDMLoss


def _loss(cfg, inputs):
    return EDMLoss(cfg.teacher.p_mean, cfg.teacher.p_std, inputs.sigma_data)


EDM = register(Method("edm", stage="teacher", kind="denoiser", section="teacher", build_loss=_loss,
                      nfe=lambda cfg: 1))
