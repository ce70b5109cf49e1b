"""Consistency mid-training (``cmt_core.objectives.cmt``): its three forms, each a method of the ``midtrain`` stage.

* ``cm``: f(x_ti, t_i) -> x_t0, a consistency model trained on (state, clean end) pairs;
* ``flow_map``: f(x_ti, t_i, t_j) -> x_tj, a two-time flow map on pairs of one trajectory;
* ``mf``: the same flow map through Mean Flow's average velocity.

Hyper-parameters in ``midtrain`` (distance, huber_c, lpips_backbone). One network evaluation per training pair.
The distance compares model-space tensors, except LPIPS, which compares images and so decodes first
(``cmt_core.encoders.decoded``); ELatentLPIPS compares the latents themselves.
"""

from cmt_core.data import POINT_DATA
from cmt_core.encoders import decoded
from cmt_core.errors import InputFileError, describe
from cmt_core.methods.registry import Method, register
from cmt_core.objectives.cmt import CMTLoss
from cmt_core.objectives.distances import make_distance
from cmt_core.objectives.latent_lpips import AUGMENT_MIN_SIDE

LPIPS_MIN_SIDE = 16  # cmt_core.objectives.distances.LPIPS.MIN_SIDE: the VGG trunk pools four times
NETWORK = {"lpips": "VGG16", "elatent_lpips": "latent VGG16"}  # the perceptual distances: their weights file holds


def _loss(form: str):
    def build(cfg, inputs):
        m = cfg.midtrain
        try:
            distance = make_distance(m.distance, m.huber_c, m.lpips_backbone)
        except (ValueError, OSError, RuntimeError) as err:  # an unreadable or foreign weights file
            raise InputFileError(f"midtrain.lpips_backbone={str(m.lpips_backbone)!r} is not a usable "
                                 f"{NETWORK.get(m.distance, 'VGG16')} weights file: {describe(err)}") from err
        return CMTLoss(form, decoded(distance, inputs.encoder) if m.distance == "lpips" else distance)
    return build


def _model_side(data) -> int | None:
    """The side of the model's space where the config alone tells it: the pixels' (identity encoder) or the latents'
    of the autoencoder trained here; None where it does not (an SD VAE's factor is in its folder, an image
    folder's size in its files)."""
    side = data.resolution or {"digits": 8, "cifar10": 32}.get(data.name)
    if side is None or data.encoder.kind == "sd_vae":
        return None
    return side // 2 ** (len(data.encoder.autoencoder.widths) - 1) if data.encoder.kind == "trained" else side


def _rules(cfg) -> None:
    """The perceptual distances compare images, not velocities (the ``mf`` form) nor 2-D points. LPIPS needs
    images of at least ``LPIPS_MIN_SIDE`` pixels a side (not 8x8 digits); ELatentLPIPS compares the model's space
    (pixels or latents) and its augmentation needs ``AUGMENT_MIN_SIDE`` a side there, checked here where the config
    tells the side and on the distance's first batch otherwise."""
    m, data = cfg.midtrain, cfg.data
    if m.distance not in NETWORK:
        return
    if m.form == "mf":
        raise ValueError(f"midtrain.distance={m.distance!r} compares images: use it with midtrain.form 'cm' or "
                         "'flow_map', not 'mf' (velocities)")
    pixels = data.resolution or {"digits": 8}.get(data.name, LPIPS_MIN_SIDE)
    if m.distance == "lpips" and (data.name in POINT_DATA or pixels < LPIPS_MIN_SIDE):
        raise ValueError(f"midtrain.distance='lpips' needs images of at least {LPIPS_MIN_SIDE} pixels a side, not "
                         f"data.name={data.name!r} at data.resolution={data.resolution}")
    if data.name in POINT_DATA:
        raise ValueError(f"midtrain.distance={m.distance!r} compares images or latents, not the 2-D points of "
                         f"data.name={data.name!r}")
    side = _model_side(data)
    if m.distance == "elatent_lpips" and side is not None and side < AUGMENT_MIN_SIDE:
        raise ValueError(f"midtrain.distance='elatent_lpips' augments the model's space, which needs at least "
                         f"{AUGMENT_MIN_SIDE} pixels a side: data.name={data.name!r} at data.resolution="
                         f"{data.resolution} with data.encoder.kind={data.encoder.kind!r} gives {side}")


for _form, _kind, _batches in (("cm", "consistency", "trajectory_ends"), ("mf", "flow_map", "trajectory_pairs"),
                               ("flow_map", "flow_map", "trajectory_pairs")):
    register(Method(_form, stage="midtrain", kind=_kind, section="midtrain", build_loss=_loss(_form),
                    nfe=lambda cfg: 1, batches=_batches, sampler=_kind, rules=_rules))
