"""EDM2 snapshot pickles, read without running any of their code.

An EDM2 snapshot (``network-snapshot-*.pkl`` of NVlabs/edm2's training loop, or a post-hoc EMA reconstruction
such as ``edm2-img64-s-1073741-0.075.pkl``) is a plain pickle of ``{"ema": <Precond>, "encoder": <Encoder>,
"dataset_kwargs": {...}, "loss_fn": <EDM2Loss>}`` (a ``dnnlib.EasyDict``), written by the same
``torch_utils.persistence`` mechanism as EDM's pickles (``cmt_core.edm_pickle`` describes it); the network's
weights are float16. ``read_edm2_pickle`` resolves the globals of EDM's format (``cmt_core.edm_pickle.STAND_INS``)
plus those of numpy arrays of numbers (EDM2's latent encoder keeps its whitening ``scale`` and ``bias`` as float32
arrays), each to a harmless stand-in; any other global raises ``ForbiddenGlobal`` naming it, before anything of
it runs, and the classes' source code recorded in the pickle is never looked at.

``load_edm2_network`` maps the ``ema`` network onto ours: EDM2's ``Precond`` (EDM's scalings with
``c_noise = ln(sigma) / 4``) onto ``cmt_core.preconditioning.Denoiser``, its ``UNet`` onto
``cmt_core.networks.edm2.EDM2UNet`` (same parameter names; float16 weights become float32, exactly). Dropped:
the uncertainty head (``logvar_fourier``, ``logvar_linear``: only EDM2's training loss uses it) and ``use_fp16``
(an execution mode: our runtime's precision decides). Refused by name: other classes, unknown constructor
arguments, and settings ``edm2_network`` cannot rebuild (see ``FIXED``).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from cmt_core.edm_pickle import STAND_INS, PersistentObject, _state_dict, read_allowed
from cmt_core.networks.edm2 import edm2_network
from cmt_core.preconditioning import Denoiser


class NDArrayClass:
    """Stands in for ``numpy.ndarray`` where a pickle names it as the class to rebuild (never instantiated)."""


class ArrayRecord:
    """A pickled numpy array of numbers, captured: ``array`` (a fresh numpy array) once its state is set."""

    def __setstate__(self, state) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("malformed numpy array state")
        _version, shape, dtype, fortran, data = state
        self.array = _numeric_array(data, dtype, shape, "F" if fortran else "C")


def _numeric_array(data, dtype, shape, order: str) -> np.ndarray:
    """``data`` (raw bytes) as an array of ``dtype`` (numbers only) and ``shape``; anything else is refused."""
    if not (isinstance(dtype, np.dtype) and dtype.kind in "biuf" and isinstance(data, (bytes, bytearray))
            and isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)
            and order in ("C", "F") and len(data) == dtype.itemsize * int(np.prod(shape, dtype=np.int64))):
        raise pickle.UnpicklingError("refused numpy array: only arrays of numbers whose bytes fit their shape")
    return np.frombuffer(bytes(data), dtype=dtype).reshape(shape, order=order).copy()


def _reconstruct_array(cls, shape, typecode) -> ArrayRecord:
    """Stands in for ``numpy.core.multiarray._reconstruct`` (pickle protocols up to 4)."""
    if cls is not NDArrayClass:
        raise pickle.UnpicklingError("refused numpy reconstruction of anything but a plain ndarray")
    return ArrayRecord()


def _array_from_buffer(data, dtype, shape, order) -> ArrayRecord:
    """Stands in for ``numpy.core.numeric._frombuffer`` (pickle protocol 5)."""
    record = ArrayRecord()
    record.array = _numeric_array(data, dtype, shape, order)
    return record


ARRAY_STAND_INS = {
    ("numpy", "ndarray"): NDArrayClass,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_array,  # numpy 1 (EDM2's pickles)
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_array,  # numpy 2
    ("numpy.core.numeric", "_frombuffer"): _array_from_buffer,
    ("numpy._core.numeric", "_frombuffer"): _array_from_buffer,
}
EDM2_STAND_INS = {**STAND_INS, **ARRAY_STAND_INS}


def read_edm2_pickle(path: Path):
    """The captured contents of an EDM2 snapshot pickle (a dict with an ``"ema"`` network, usually): plain
    ``PersistentObject`` / ``ModuleRecord`` trees of dicts, lists, numbers, strings, tensors and ``ArrayRecord`` s;
    every global outside ``EDM2_STAND_INS`` is refused (``cmt_core.edm_pickle.AllowListUnpickler``)."""
    return read_allowed(path, EDM2_STAND_INS, "an EDM2 snapshot pickle")


# ------------------------------------------------------------------------------ mapping onto our network

PRECOND_ARGS = {"img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data", "logvar_channels"}
# EDM2's UNet and Block constructor defaults (a pickle records only the arguments that were passed)
UNET_DEFAULTS = {"model_channels": 192, "channel_mult": [1, 2, 3, 4], "channel_mult_noise": None,
                 "channel_mult_emb": None, "num_blocks": 3, "attn_resolutions": [16, 8], "label_balance": 0.5,
                 "concat_balance": 0.5, "resample_filter": [1, 1], "channels_per_head": 64, "dropout": 0,
                 "res_balance": 0.3, "attn_balance": 0.3, "clip_act": 256}
UNET_REQUIRED = ("img_resolution", "img_channels", "label_dim")
# Settings that ``edm2_network`` (this repository's architecture values) does not take: a network is loaded only
# with EDM2's values of them, which every EDM2 configuration uses.
FIXED = {key: UNET_DEFAULTS[key] for key in ("channel_mult_noise", "label_balance", "concat_balance",
                                             "resample_filter", "channels_per_head", "res_balance", "attn_balance",
                                             "clip_act")}
PRECOND_MODULES = {"unet", "logvar_fourier", "logvar_linear"}


@dataclass
class EDM2Network:
    """An EDM2 network as ours: the denoiser (``Denoiser`` around an ``EDM2UNet``, eval mode); ``network``: the
    values that rebuild it (``kind="edm2"``, ``edm2_network``'s architecture arguments, ``label_dim`` and
    ``sigma_data``); the sample shape ``(C, R, R)`` (R: ``resolution``); and the snapshot's ``encoder``: its
    class name and plain settings (``StandardRGBEncoder``: pixels in [-1, 1]; ``StabilityVAEEncoder``:
    ``vae_name`` and the latent whitening ``scale``, ``bias`` per channel)."""

    model: nn.Module
    network: dict
    sample_shape: tuple[int, int, int]
    label_dim: int
    sigma_data: float
    encoder: dict | None
    precond_class: str = "Precond"

    @property
    def resolution(self) -> int:
        return self.sample_shape[1]


def load_edm2_network(path: Path) -> EDM2Network:
    """The ``ema`` network of the EDM2 snapshot pickle at ``path`` as our denoiser, computing what EDM2's
    ``Precond`` computes in float32 (up to floating-point rounding), for sigma >= 1e-3 (our ``c_noise`` floor)."""
    return edm2_snapshot(read_edm2_pickle(path), path)


def edm2_snapshot(data, path) -> EDM2Network:
    """``load_edm2_network`` of a snapshot already read (``read_edm2_pickle``) from ``path`` (named in errors)."""
    if not isinstance(data, dict) or "ema" not in data:
        raise ValueError(f"{path} is not an EDM2 snapshot pickle: no 'ema' entry")
    result = edm2_precond_network(data["ema"])
    result.encoder = _encoder_settings(data.get("encoder"))
    return result


def edm2_precond_network(precond) -> EDM2Network:
    """Map a captured EDM2 ``Precond`` (around its ``UNet``) onto ours; refuses what ours does not compute."""
    name = getattr(precond, "class_name", type(precond).__name__)
    if not isinstance(precond, PersistentObject) or name != "Precond":
        raise ValueError(f"unsupported EDM2 network class {name!r}; supported: 'Precond'")
    modules = precond.state.get("_modules") or {}
    extra = set(modules) - PRECOND_MODULES
    if extra:
        raise ValueError(f"unknown Precond submodules {sorted(extra)}")
    unet = modules.get("unet")
    if not isinstance(unet, PersistentObject) or unet.class_name != "UNet":
        raise ValueError(f"unsupported network {getattr(unet, 'class_name', unet)!r} in Precond; supported: UNet")
    unknown = set(precond.init_kwargs()) - PRECOND_ARGS - set(UNET_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown Precond arguments {sorted(unknown)}")
    args = _unet_args(unet.init_kwargs())
    sigma_data = precond.state.get("sigma_data")
    if isinstance(sigma_data, bool) or not isinstance(sigma_data, (int, float)) or not sigma_data > 0:
        raise ValueError(f"Precond sigma_data={sigma_data!r} is not a positive number")
    mults = [int(m) for m in args["channel_mult"]]
    emb_mult = args["channel_mult_emb"] if args["channel_mult_emb"] is not None else max(mults)
    network = dict(kind="edm2", width=args["model_channels"], depth=args["num_blocks"], channel_mult=tuple(mults),
                   attention_resolutions=tuple(args["attn_resolutions"]), dropout=float(args["dropout"]),
                   emb_dim=args["model_channels"] * emb_mult, label_dim=args["label_dim"],
                   sigma_data=float(sigma_data))
    sample_shape = (args["img_channels"], args["img_resolution"], args["img_resolution"])
    architecture = {k: v for k, v in network.items() if k not in ("kind", "sigma_data")}
    model = Denoiser(edm2_network(sample_shape, num_times=1, **architecture), float(sigma_data))
    try:
        model.raw.load_state_dict(_state_dict(unet))
    except RuntimeError as err:
        raise ValueError(f"the EDM2 UNet weights do not fit our EDM2 U-Net: {err}") from err
    return EDM2Network(model.eval(), network, sample_shape, args["label_dim"], float(sigma_data), None)


def _unet_args(kwargs: dict) -> dict:
    """EDM2 UNet's constructor arguments, defaults filled in, or an error naming the first one ours does not
    implement."""
    unknown = set(kwargs) - set(UNET_DEFAULTS) - set(UNET_REQUIRED)
    if unknown:
        raise ValueError(f"unknown EDM2 UNet arguments {sorted(unknown)}")
    missing = [key for key in UNET_REQUIRED if key not in kwargs]
    if missing:
        raise ValueError(f"EDM2 UNet arguments {missing} are missing from the pickle")
    args = {**UNET_DEFAULTS, **kwargs}
    for key, supported in FIXED.items():
        value = list(args[key]) if isinstance(args[key], (list, tuple)) else args[key]
        if key == "channel_mult_noise" and value == args["channel_mult"][0]:
            continue  # the default's width: the first resolution's channels
        if value != supported:
            raise ValueError(f"EDM2 UNet {key}={args[key]!r} is not supported: only EDM2's default {supported!r}")
    for key in ("img_resolution", "img_channels", "label_dim", "model_channels", "num_blocks"):
        if isinstance(args[key], bool) or not isinstance(args[key], int) or args[key] < 0:
            raise ValueError(f"EDM2 UNet {key}={args[key]!r} is not a non-negative integer")
    return args


def _encoder_settings(encoder) -> dict | None:
    """The snapshot's encoder as its class name and plain settings (numbers, strings, lists); None if absent."""
    if encoder is None:
        return None
    if not isinstance(encoder, PersistentObject):
        raise ValueError(f"the snapshot's encoder is a {type(encoder).__name__}, not an EDM2 encoder record")
    settings = {"class_name": encoder.class_name}
    for key, value in encoder.state.items():
        if key.startswith("_"):
            continue
        if isinstance(value, ArrayRecord):
            value = value.array.tolist()
        if not isinstance(value, (bool, int, float, str, list, type(None))):
            raise ValueError(f"the snapshot's encoder setting {key} is a {type(value).__name__}")
        settings[key] = value
    return settings
