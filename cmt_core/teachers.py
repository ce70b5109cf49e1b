"""Teachers: a denoiser ``D(x, t: (B,), cond=None) -> x_0 estimate`` (an ``nn.Module``).

Sources: the exact denoiser of a 2-D synthetic distribution (class-conditional when the distribution has
classes); EDM pre-training here; our own model file; an EDM network pickle or an EDM2 snapshot pickle
(``cmt_core.edm_pickle``, ``cmt_core.edm2_pickle``) or a SiT flow-matching checkpoint (``cmt_core.sit_checkpoint``),
each stored by the teacher stage as our model file once; a
TorchScript file computing ``D(x, sigma)``; or ``module:callable`` returning a denoiser module ``D(x, sigma)``.
TorchScript and callable teachers are unconditional: they refuse a non-empty ``cond`` rather than ignore it. Every
function here takes plain values (the source's name, paths).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from cmt_core.conditioning import Cond, check_known, to_device
from cmt_core.edm2_pickle import EDM2Network, edm2_snapshot, read_edm2_pickle
from cmt_core.edm_pickle import EDMNetwork, edm_network
from cmt_core.guidance import guided
from cmt_core.models import load_model

SOURCES = ("exact", "pretrain", "checkpoint", "edm_pickle", "sit", "torchscript", "callable")
LOADED = ("checkpoint", "edm_pickle", "sit", "torchscript", "callable")  # read or run from outside
VELOCITY = ("sit",)  # velocity-parametrised weights: no EDM-preconditioned student starts from them
PROGRAMS = ("torchscript", "callable")  # run as they are: no network weights of ours to initialise from


class ExactDenoiser(nn.Module):
    """The closed-form posterior mean of a synthetic distribution (float64 internally), given the class of each
    row when the distribution has classes and ``cond`` holds ``class_labels``."""

    def __init__(self, distribution):
        super().__init__()
        self.distribution = distribution

    def forward(self, x: torch.Tensor, t, cond: Cond | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device, dtype=torch.float64).expand(x.shape[0])
        return self.distribution.denoise(x.double(), t, to_device(cond, x.device, torch.float64)).to(x.dtype)


class OutsideDenoiser(nn.Module):
    """Adapts a denoiser from outside (a TorchScript graph or a user's module) computing ``D(x, sigma)`` to the
    teacher interface: sigma as a ``(B,)`` tensor of x's dtype; no conditioning."""

    def __init__(self, module, who: str):
        super().__init__()
        self.module, self.who = module, who

    def forward(self, x, t, cond: Cond | None = None):
        check_known(cond, (), self.who)
        return self.module(x, torch.as_tensor(t, device=x.device, dtype=x.dtype).expand(x.shape[0]))


def load_teacher(source: str, path=None, target: str | None = None, distribution=None) -> nn.Module:
    """The teacher of the sources read as they are: ``exact`` (of ``distribution``), ``checkpoint`` (our model file
    at ``path``), ``torchscript`` (``path``), ``callable`` (``target``, 'module:function'); ``pretrain`` is trained
    and ``edm_pickle`` and ``sit`` converted by the teacher stage (``cmt_core.stages``)."""
    if source == "exact":
        if distribution is None:
            raise ValueError("teacher.source='exact' needs a synthetic distribution with a closed-form denoiser")
        return ExactDenoiser(distribution)
    if source == "checkpoint":
        return load_model(path)
    if source == "torchscript":
        return OutsideDenoiser(torch.jit.load(str(path), map_location="cpu"), "a TorchScript teacher").eval()
    if source == "callable":
        module, name = target.split(":")
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
        teacher = obj()
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher.target {target!r} returned {type(teacher).__name__}, not an nn.Module")
        return OutsideDenoiser(teacher.eval(), f"the callable teacher {target}").eval()
    raise ValueError(f"teacher.source={source!r} is not loaded as it is: the teacher stage makes its model file")


def edm_teacher(path, sample_shape) -> EDMNetwork | EDM2Network:
    """The EDM network pickle or EDM2 snapshot pickle at ``path`` as our denoiser, checked to denoise samples of
    ``sample_shape``. Either result has the fields the teacher stage uses: ``model`` (the denoiser, eval mode),
    ``network`` (the values ``build_model`` rebuilds it from: ``kind`` 'unet' or 'edm2', ``label_dim`` (EDM2's
    always, EDM's when > 0), ``sigma_data`` except for VP), ``sample_shape`` and ``precond_class``.

    The pickle is read without running any of its code (EDM2's reader: EDM's format plus numpy arrays of numbers;
    any other global raises ``ForbiddenGlobal`` naming it). An ``ema`` of EDM2's class ``Precond`` is an EDM2
    snapshot (``cmt_core.edm2_pickle.edm2_snapshot``); anything else is mapped as an EDM network (``EDMPrecond`` /
    ``VPPrecond``; other classes refused by name)."""
    data = read_edm2_pickle(path)
    if not isinstance(data, dict) or "ema" not in data:
        raise ValueError(f"{path} is not an EDM network or EDM2 snapshot pickle: no 'ema' entry")
    if getattr(data["ema"], "class_name", None) == "Precond":
        edm = edm2_snapshot(data, path)
    else:
        edm = edm_network(data["ema"])
    if edm.sample_shape != tuple(sample_shape):
        raise ValueError(f"the EDM network at {path} denoises samples of shape {edm.sample_shape}, "
                         f"the data has shape {tuple(sample_shape)}")
    return edm


def teacher_denoiser(source: str, path, target: str | None, distribution, weights: Path, guidance: str = "none",
                     scale: float = 1.0, guide_weights: Path | None = None) -> nn.Module:
    """The denoiser that solves the ODE: the model file at ``weights`` (the teacher artifact's) for ``pretrain``,
    ``edm_pickle`` and ``sit``, otherwise ``load_teacher`` (the exact denoiser of ``distribution``, a file, a
    callable);
    guided (``cmt_core.guidance.guided``) by ``guidance`` ('none' | 'cfg' | 'autoguidance') at ``scale``, an
    autoguided one by the guide's model file ``guide_weights``."""
    teacher = load_model(weights) if source in ("pretrain", "edm_pickle", "sit") else load_teacher(source, path, target,
                                                                                           distribution)
    guide = load_model(guide_weights) if guidance == "autoguidance" and scale != 1.0 else None
    return guided(teacher, guidance, scale, guide)
