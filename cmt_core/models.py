"""Building the preconditioned models of each stage and saving them as self-describing files.

Kinds: ``denoiser`` (teacher, one time; EDM's or EDM's VP preconditioning), ``consistency`` (CM, one time,
boundary form at ``sigma_min``), ``flow_map`` (two times: flow map / Mean Flow). A model file holds the kind,
the ``network`` mapping (the architecture values ``cmt_core.networks.build.ARCHITECTURE`` plus the
preconditioning's ``sigma_data`` and ``consistency_boundary``: a ``NetworkConfig`` dumped by the stage that saved
it, with ``label_dim`` only for a class-conditional model, so files of unconditional ones read as before), the
sample shape, ``sigma_min`` (consistency models and flow maps; None otherwise), the denoiser's
``preconditioning`` (denoisers; None otherwise) and the weights, so ``load_model`` rebuilds it without the
pipeline config. It holds nothing but plain values and tensors, and is read with ``weights_only=True``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from cmt_core.checkpoint import CheckpointError, atomic_save, load_file
from cmt_core.networks import build_network
from cmt_core.networks.build import ARCHITECTURE
from cmt_core.networks.embedding import LaterTimeMLP
from cmt_core.preconditioning import ConsistencyModel, FlowMap, make_denoiser

NUM_TIMES = {"denoiser": 1, "consistency": 1, "flow_map": 2}


def build_model(kind: str, network: Mapping, sample_shape, sigma_min: float | None = None,
                preconditioning: dict | None = None) -> nn.Module:
    """An untrained model of ``kind``; ``network``: the architecture values (``ARCHITECTURE``; a missing
    ``label_dim`` is 0, unconditional), ``sigma_data`` and, for consistency models, ``consistency_boundary``;
    ``sigma_min`` (the boundary time) is required for consistency models and is a flow map's clean end
    (``FlowMap``: jumps below it are conditioned on it; None: no floor); ``preconditioning`` names a denoiser's
    wrapper (``cmt_core.preconditioning.make_denoiser``; None: EDM's)."""
    if kind not in NUM_TIMES:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(NUM_TIMES)}")
    architecture = {k: network[k] for k in ARCHITECTURE if k in network}
    raw = build_network(sample_shape=tuple(sample_shape), num_times=NUM_TIMES[kind], **architecture)
    sigma_data = network.get("sigma_data")  # not used by a VP-preconditioned denoiser
    if kind == "denoiser":
        return make_denoiser(raw, sigma_data, preconditioning)
    if kind == "consistency":
        if sigma_min is None:
            raise ValueError("a consistency model needs sigma_min (its boundary time)")
        return ConsistencyModel(raw, sigma_data, sigma_min, network["consistency_boundary"])
    return FlowMap(raw, sigma_data, sigma_min)


def label_dim_of(model: nn.Module) -> int:
    """The number of classes a model's raw network is conditioned on (0: unconditional, or not a model of ours)."""
    return getattr(getattr(model, "raw", None), "label_dim", 0) or 0


def init_from(model: nn.Module, source: nn.Module) -> nn.Module:
    """Copy ``source``'s raw-network weights into ``model`` (a 1-time net into a 2-time one is allowed:
    the extra time embedding keeps its zero initialisation, so the function is unchanged)."""
    missing, unexpected = model.raw.load_state_dict(source.raw.state_dict(), strict=False)
    later_times = {f"{name}.{key}" for name, module in model.raw.named_modules() if isinstance(module, LaterTimeMLP)
                   for key in module.state_dict()}
    if unexpected or set(missing) - later_times:
        raise ValueError(f"incompatible weights: missing {missing}, unexpected {unexpected}")
    return model


def save_model(path: Path, model: nn.Module, kind: str, network: Mapping, sample_shape) -> None:
    """Write ``model`` with what ``load_model`` needs to rebuild it; ``network``: a ``NetworkConfig`` dumped as
    JSON values (``model_dump(mode="json")``)."""
    atomic_save({"kind": kind, "network": dict(network), "sample_shape": list(sample_shape),
                 "sigma_min": getattr(model, "sigma_min", None),
                 "preconditioning": getattr(model, "preconditioning", None),
                 "state_dict": model.state_dict()}, Path(path))


MAX_SAMPLE_VALUES = 1 << 28  # numbers in one sample


def _fields_problem(blob) -> str | None:
    """What makes a model file's plain fields unusable (each names its field), or None."""
    if not isinstance(blob, dict):
        return f"holds a {type(blob).__name__}, not a model file's fields"
    shape = blob.get("sample_shape")
    sigma_min = blob.get("sigma_min")
    if blob.get("kind") not in NUM_TIMES:
        return f"kind={str(blob.get('kind'))[:40]!r} is not one of {sorted(NUM_TIMES)}"
    if not isinstance(blob.get("network"), dict):
        return "network is not a mapping of network values"
    if not (isinstance(shape, (list, tuple)) and 1 <= len(shape) <= 4
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
            and math.prod(shape) <= MAX_SAMPLE_VALUES):
        return f"sample_shape={str(shape)[:40]} is not 1 to 4 positive sizes of at most {MAX_SAMPLE_VALUES} numbers"
    if sigma_min is not None and not (isinstance(sigma_min, (int, float)) and 0 < sigma_min < math.inf):
        return f"sigma_min={str(sigma_min)[:40]} is not a positive number"
    if blob.get("preconditioning") is not None and not isinstance(blob["preconditioning"], dict):
        return "preconditioning is not a mapping"
    state = blob.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return "state_dict is not a mapping of tensors"
    return None


def load_model(path: Path, map_location="cpu") -> nn.Module:
    """Rebuild a model written by ``save_model`` (eval mode); a file that is unreadable or whose fields or weights
    do not fit raises ``CheckpointError`` naming the field (``model_from_fields``)."""
    return model_from_fields(load_file(path, map_location), path)


def model_from_fields(blob, where) -> nn.Module:
    """The model (eval mode) of a model file's fields ``blob`` (``save_model``'s mapping, or the same fields read
    from another format, e.g. an exported generator's JSON and safetensors weights). The fields are checked first
    (a file anyone may have edited), and the network is built on the meta device and compared with the weights
    before any memory is allocated; ``CheckpointError`` names ``where`` and the field that does not fit."""
    problem = _fields_problem(blob)
    if problem:
        raise CheckpointError(f"{where}: {problem}")
    # Files written before VP teachers existed have no "preconditioning": their denoisers are EDM's.
    args = (blob["kind"], blob["network"], blob["sample_shape"], blob["sigma_min"], blob.get("preconditioning"))
    try:
        with torch.device("meta"):
            wanted = {k: tuple(v.shape) for k, v in build_model(*args).state_dict().items()}
    except Exception as err:  # network values no network is built from
        raise CheckpointError(f"{where}: network={str(blob['network'])[:80]} builds no model: {err}") from None
    found = {k: tuple(v.shape) for k, v in blob["state_dict"].items()}
    if found != wanted:
        odd = sorted(set(found) ^ set(wanted)) or [k for k in wanted if found[k] != wanted[k]]
        raise CheckpointError(f"{where}: its network values do not fit its state_dict (first difference: "
                              f"{odd[0]!r})")
    model = build_model(*args)
    model.load_state_dict(blob["state_dict"])
    return model.eval()
