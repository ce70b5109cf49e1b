"""Consistency mid-training (``cmt_core.objectives.cmt``): its three forms, each a method of the ``midtrain`` stage.

* ``cm``: f(x_ti, t_i) -> x_t0, a consistency model trained on (state, clean end) pairs;
* ``flow_map``: f(x_ti, t_i, t_j) -> x_tj, a two-time flow map on pairs of one trajectory;
* ``mf``: the same flow map through Mean Flow's average velocity.

Hyper-parameters in ``midtrain`` (distance, huber_c, lpips_backbone). One network evaluation per training pair.
The distance compares model-space tensors, except LPIPS, which compares images and so decodes first
(``cmt_core.encoders.decoded``).
"""

from cmt_core.data import POINT_DATA
from cmt_core.encoders import decoded
from cmt_core.errors import InputFileError, describe
from cmt_core.methods.registry import Method, register
from cmt_core.objectives.cmt import CMTLoss
from cmt_core.objectives.distances import make_distance

LPIPS_MIN_SIDE = 16  # cmt_core.objectives.distances.LPIPS.MIN_SIDE: the VGG trunk pools four times


def _loss(form: str):
    def build(cfg, inputs):
        m = cfg.midtrain
        try:
            distance = make_distance(m.distance, m.huber_c, m.lpips_backbone)
        except (ValueError, OSError, RuntimeError) as err:  # an unreadable or foreign weights file
            raise InputFileError(f"midtrain.lpips_backbone={str(m.lpips_backbone)!r} is not a usable VGG16 weights "
                                 f"file: {describe(err)}") from err
        return CMTLoss(form, decoded(distance, inputs.encoder) if m.distance == "lpips" else distance)
    return build


def _rules(cfg) -> None:
    """LPIPS compares images of at least ``LPIPS_MIN_SIDE`` pixels a side: not velocities (the ``mf`` form), not
    2-D points, not 8x8 digits."""
    m, data = cfg.midtrain, cfg.data
    if m.distance != "lpips":
        return
    if m.form == "mf":
        raise ValueError("midtrain.distance='lpips' compares images: use it with midtrain.form 'cm' or 'flow_map', "
                         "not 'mf' (velocities)")
    side = data.resolution or {"digits": 8}.get(data.name, LPIPS_MIN_SIDE)
    if data.name in POINT_DATA or side < LPIPS_MIN_SIDE:
        raise ValueError(f"midtrain.distance='lpips' needs images of at least {LPIPS_MIN_SIDE} pixels a side, not "
                         f"data.name={data.name!r} at data.resolution={data.resolution}")


for _form, _kind, _batches in (("cm", "consistency", "trajectory_ends"), ("mf", "flow_map", "trajectory_pairs"),
                               ("flow_map", "flow_map", "trajectory_pairs")):
    register(Method(_form, stage="midtrain", kind=_kind, section="midtrain", build_loss=_loss(_form),
                    nfe=lambda cfg: 1, batches=_batches, sampler=_kind, rules=_rules))
