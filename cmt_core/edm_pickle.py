"""EDM network pickles, read without running any of their code.

An EDM network pickle (EDM's ``edm-cifar10-32x32-uncond-vp.pkl`` or ``-cond-vp.pkl``, a ``network-snapshot-*.pkl``
of EDM, ECT or CMT) is a plain pickle of ``{"ema": <network>, "loss_fn": ..., "augment_pipe": ...,
"dataset_kwargs": {...}}``. EDM's ``torch_utils.persistence`` writes every instance of its classes as a call of
its reconstructor on a record holding the source code of the class's whole module, the class name and the
instance's ``__dict__`` (constructor arguments, parameters, buffers, submodules). Unpickling such a file the
ordinary way executes that source code, and any global a pickle names can be called.

``AllowListUnpickler`` resolves only the globals the format needs, each to a harmless stand-in:

* the persistence reconstructor -> ``PersistentObject`` (class name and ``__dict__``; the source is dropped unread);
* torch's tensor and parameter rebuilders -> plain tensors on storages read by ``torch.load(weights_only=True)``;
* numpy's scalar rebuilder (EDM keeps numpy floats such as ``skip_scale = np.sqrt(0.5)`` on its blocks) -> the
  Python number, for numeric dtypes only;
* ``torch.nn.ModuleDict`` -> ``ModuleRecord``; ``collections.OrderedDict``; EDM's ``EasyDict`` -> ``dict``.

Any other global raises ``ForbiddenGlobal`` naming it, before anything of it runs. ``load_edm_network`` then
maps the ``ema`` network onto ours: SongUNet at its DDPM++ configuration, unconditional or class-conditional
(``label_dim > 0``: its ``map_label`` layer), onto ``cmt_core.networks.unet.UNet`` (same parameter names),
``EDMPrecond`` / ``VPPrecond`` onto ``Denoiser`` / ``VPDenoiser``; any other class, constructor argument or setting
our network does not implement is refused by name. SongUNet's ``label_dropout`` (a training-time setting) is
accepted and ignored: our networks never drop labels, the training loop drops them for whole batches.
"""

from __future__ import annotations

import collections
import io
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cmt_core.models import build_model


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle names a global that an EDM network pickle does not need; nothing of it was run."""


class ModuleRecord:
    """A pickled torch module, captured: ``state`` is its ``__dict__`` as pickled (``_parameters``,
    ``_buffers``, ``_modules``, ...). Unpickling creates it empty and hands it the state (``__setstate__``)."""

    def __setstate__(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"a module's pickled state must be a dict, got {type(state).__name__}")
        self.state = state


class PersistentObject(ModuleRecord):
    """An instance of an EDM persistent class, captured: ``class_name`` and its ``__dict__`` as ``state``."""

    def __init__(self, class_name: str, state: dict):
        self.class_name = class_name
        self.__setstate__(state)

    def init_kwargs(self) -> dict:
        """The keyword arguments the instance was constructed with (EDM records them on every instance)."""
        args, kwargs = self.state.get("_init_args"), self.state.get("_init_kwargs")
        if args or not isinstance(kwargs, dict):
            raise ValueError(f"{self.class_name} in the pickle has no record of its constructor keyword arguments "
                             f"(positional {args!r}, keyword {kwargs!r})")
        return kwargs


def _capture_persistent(meta: dict) -> PersistentObject:
    """Stands in for EDM's reconstructor: keeps class name and state, never looks at ``meta["module_src"]``."""
    if not (isinstance(meta, dict) and meta.get("type") == "class" and isinstance(meta.get("class_name"), str)):
        raise pickle.UnpicklingError("malformed EDM persistent-object record")
    return PersistentObject(meta["class_name"], meta.get("state") or {})


def _load_storage(data: bytes) -> torch.storage.TypedStorage:
    """A storage pickled by torch (``torch.save`` bytes), read with torch's weights-only unpickler."""
    storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"expected a pickled tensor storage, got {type(storage).__name__}")
    return storage


def _rebuild_tensor(storage, storage_offset: int, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None) -> torch.Tensor:
    """A tensor viewing ``storage``; requires_grad, hooks and metadata do not matter to a teacher's weights."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"a tensor must view a storage, got {type(storage).__name__}")
    with warnings.catch_warnings():  # typed storages are deprecated, but they are what the format holds
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        untyped = storage.untyped()
    return torch.empty(0, dtype=storage.dtype).set_(untyped, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None) -> torch.Tensor:
    """A parameter as its plain tensor."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError(f"a parameter must hold a tensor, got {type(data).__name__}")
    return data


def _numeric_dtype(spec, align=False, copy=True) -> np.dtype:
    """A numpy dtype of booleans or numbers (what a pickled numpy scalar names); any other is refused."""
    dtype = np.dtype(spec) if isinstance(spec, str) else None
    if dtype is None or dtype.kind not in "biuf":
        raise pickle.UnpicklingError(f"refused numpy dtype {spec!r}: only numeric scalars are expected")
    return dtype


def _numpy_scalar(dtype, data) -> bool | int | float:
    """A pickled numpy scalar as the Python number it holds."""
    if not (isinstance(dtype, np.dtype) and dtype.kind in "biuf" and isinstance(data, bytes)
            and len(data) == dtype.itemsize):
        raise pickle.UnpicklingError("malformed numpy scalar")
    return np.frombuffer(data, dtype=dtype)[0].item()


STAND_INS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _capture_persistent,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch.nn.modules.container", "ModuleDict"): ModuleRecord,
    ("numpy", "dtype"): _numeric_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,  # numpy 1 (EDM's pickles)
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,  # numpy 2
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("dnnlib.util", "EasyDict"): dict,
}


class AllowListUnpickler(pickle.Unpickler):
    """Unpickles into plain data: every global the file names is looked up in ``stand_ins`` (``(module, name)`` ->
    a harmless stand-in, e.g. ``STAND_INS``) and any other is refused with ``ForbiddenGlobal``, naming the global and
    ``what`` the file should be. Nothing of the file runs."""

    def __init__(self, file, stand_ins: dict, what: str):
        super().__init__(file)
        self.stand_ins, self.what = stand_ins, what

    def find_class(self, module: str, name: str):
        try:
            return self.stand_ins[(module, name)]
        except KeyError:
            raise ForbiddenGlobal(f"refused global {module}.{name}: {self.what} does not need it "
                                  "(nothing of it was run)") from None


def read_allowed(path: Path, stand_ins: dict, what: str):
    """The contents of the pickle at ``path`` read by ``AllowListUnpickler``."""
    with open(path, "rb") as f:
        return AllowListUnpickler(f, stand_ins, what).load()


def read_edm_pickle(path: Path):
    """The captured contents of an EDM network pickle (usually a dict with an ``"ema"`` network)."""
    return read_allowed(path, STAND_INS, "an EDM network pickle")


# ------------------------------------------------------------------------------ mapping onto our network

# SongUNet's constructor defaults: a pickle records only the arguments that were passed.
SONGUNET_DEFAULTS = {
    "label_dim": 0, "augment_dim": 0, "model_channels": 128, "channel_mult": [1, 2, 2, 2], "channel_mult_emb": 4,
    "num_blocks": 4, "attn_resolutions": [16], "dropout": 0.10, "label_dropout": 0,
    "embedding_type": "positional", "channel_mult_noise": 1, "encoder_type": "standard",
    "decoder_type": "standard", "resample_filter": [1, 1],
}
SONGUNET_REQUIRED = ("img_resolution", "in_channels", "out_channels")
# The settings of SongUNet that our U-Net implements (its DDPM++ configuration).
DDPMPP = {"embedding_type": "positional", "channel_mult_noise": 1, "encoder_type": "standard",
          "decoder_type": "standard", "resample_filter": [1, 1]}
# The arguments of each supported preconditioning class besides those it passes on to SongUNet. Their
# sampling bounds (sigma_min, sigma_max, epsilon_t) are not part of the denoiser, and use_fp16 is an execution
# mode: our runtime's precision decides.
PRECONDITIONING_ARGS = {
    "EDMPrecond": {"img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max",
                   "sigma_data", "model_type"},
    "VPPrecond": {"img_resolution", "img_channels", "label_dim", "use_fp16", "beta_d", "beta_min", "M",
                  "epsilon_t", "model_type"},
}


@dataclass
class EDMNetwork:
    """An EDM network as ours: the denoiser (eval mode), its network values (architecture, ``label_dim`` when the
    network is class-conditional, and, for ``EDMPrecond``, ``sigma_data``: the values ``build_model`` takes), sample
    shape ``(C, H, W)``, and the name of the EDM preconditioning class it came from."""

    model: nn.Module
    network: dict
    sample_shape: tuple[int, int, int]
    precond_class: str


def load_edm_network(path: Path) -> EDMNetwork:
    """The ``ema`` network of the EDM network pickle at ``path`` as our denoiser, computing what EDM computes
    (up to floating-point rounding)."""
    data = read_edm_pickle(path)
    if not isinstance(data, dict) or "ema" not in data:
        raise ValueError(f"{path} is not an EDM network pickle: no 'ema' entry")
    return edm_network(data["ema"])


def edm_network(precond) -> EDMNetwork:
    """Map a captured EDM preconditioning object (``EDMPrecond`` / ``VPPrecond`` around a ``SongUNet``) onto ours."""
    name = getattr(precond, "class_name", type(precond).__name__)
    if not isinstance(precond, PersistentObject) or name not in PRECONDITIONING_ARGS:
        raise ValueError(f"unsupported EDM network class {name!r}; supported: {sorted(PRECONDITIONING_ARGS)}")
    unet = precond.state.get("_modules", {}).get("model")
    if not isinstance(unet, PersistentObject) or unet.class_name != "SongUNet":
        raise ValueError(f"unsupported network {getattr(unet, 'class_name', unet)!r} in {name}; supported: SongUNet")
    unknown = set(precond.init_kwargs()) - PRECONDITIONING_ARGS[name] - set(SONGUNET_DEFAULTS) - set(SONGUNET_REQUIRED)
    if unknown:
        raise ValueError(f"unknown {name} arguments {sorted(unknown)}")
    args = _songunet_args(unet.init_kwargs())
    settings = precond.state  # the instance's attributes: the constructor's values, defaults included
    if settings.get("label_dim", 0) != args["label_dim"]:
        raise ValueError(f"{name} label_dim={settings.get('label_dim')!r} differs from its SongUNet's "
                         f"label_dim={args['label_dim']}")
    architecture = dict(kind="unet", width=args["model_channels"], depth=args["num_blocks"],
                        channel_mult=tuple(args["channel_mult"]), attention_resolutions=tuple(args["attn_resolutions"]),
                        dropout=args["dropout"], emb_dim=args["model_channels"] * args["channel_mult_emb"])
    if args["label_dim"]:  # only then: the network values of an unconditional network are as they always were
        architecture["label_dim"] = args["label_dim"]
    if name == "EDMPrecond":
        network = {**architecture, "sigma_data": float(settings["sigma_data"])}
        preconditioning = {"name": "edm"}
    else:
        network = architecture  # sigma_data does not enter the VP denoiser
        preconditioning = {"name": "vp", "beta_d": float(settings["beta_d"]), "beta_min": float(settings["beta_min"]),
                           "num_steps": int(settings["M"])}
    sample_shape = (args["in_channels"], args["img_resolution"], args["img_resolution"])
    model = build_model("denoiser", network, sample_shape, preconditioning=preconditioning)
    try:
        model.raw.load_state_dict(_unet_weights(unet, args))
    except RuntimeError as err:
        raise ValueError(f"the SongUNet weights do not fit our U-Net: {err}") from err
    return EDMNetwork(model.eval(), network, sample_shape, name)


def _songunet_args(kwargs: dict) -> dict:
    """SongUNet's constructor arguments, defaults filled in, or an error naming the first one our U-Net does
    not implement."""
    unknown = set(kwargs) - set(SONGUNET_DEFAULTS) - set(SONGUNET_REQUIRED)
    if unknown:
        raise ValueError(f"unknown SongUNet arguments {sorted(unknown)}")
    missing = [key for key in SONGUNET_REQUIRED if key not in kwargs]
    if missing:
        raise ValueError(f"SongUNet arguments {missing} are missing from the pickle")
    args = {**SONGUNET_DEFAULTS, **kwargs}
    for key, supported in DDPMPP.items():
        value = list(args[key]) if isinstance(supported, list) else args[key]
        if value != supported:
            raise ValueError(f"SongUNet {key}={args[key]!r} is not supported: "
                             f"our U-Net is DDPM++ ({key}={supported!r})")
    if args["out_channels"] != args["in_channels"]:
        raise ValueError(f"SongUNet out_channels={args['out_channels']} differs from in_channels={args['in_channels']}")
    if isinstance(args["label_dim"], bool) or not isinstance(args["label_dim"], int) or args["label_dim"] < 0:
        raise ValueError(f"SongUNet label_dim={args['label_dim']!r} is not a non-negative integer")
    return args


def _unet_weights(unet: PersistentObject, args: dict) -> dict[str, torch.Tensor]:
    """SongUNet's state dict under its own names, less what our U-Net computes without weights: the [1, 1]
    resampling filters (average pooling / nearest upsampling) and the augmentation-label layer (EDM feeds it
    only while training with augmentation)."""
    weights = _state_dict(unet)
    for key in [k for k in weights if k.endswith(".resample_filter")]:
        if not torch.equal(weights.pop(key), torch.full((1, 1, 2, 2), 0.25)):
            raise ValueError(f"SongUNet {key} is not the [1, 1] filter")
    if args["augment_dim"]:
        shape = tuple(weights.pop("map_augment.weight").shape)
        if shape != (args["model_channels"], args["augment_dim"]):
            raise ValueError(f"SongUNet map_augment.weight has shape {shape}")
    return weights


def _state_dict(module: ModuleRecord, prefix: str = "") -> dict[str, torch.Tensor]:
    """A captured module's parameters and persistent buffers under dotted names, as ``nn.Module.state_dict``."""
    state = module.state
    transient = state.get("_non_persistent_buffers_set") or set()
    tensors = {**state.get("_parameters", {}),
               **{k: v for k, v in state.get("_buffers", {}).items() if k not in transient}}
    out = {}
    for name, tensor in tensors.items():
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{prefix}{name} in the pickle is a {type(tensor).__name__}, not a tensor")
        if tensor is not None:
            out[prefix + name] = tensor
    for name, child in state.get("_modules", {}).items():
        if child is None:
            continue
        if not isinstance(child, ModuleRecord):
            raise ValueError(f"{prefix}{name} in the pickle is not a module")
        out.update(_state_dict(child, f"{prefix}{name}."))
    return out
