"""Teachers: a denoiser ``D(x, t: (B,)) -> x_0 estimate`` (an ``nn.Module``).

Sources: the exact denoiser of a 2-D synthetic distribution; EDM pre-training here; our own model file;
an EDM network pickle (``cmt_core.edm_pickle``; the teacher stage stores it as our model file once);
a TorchScript file computing ``D(x, sigma)``; or ``module:callable`` returning a denoiser module.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from cmt_core.config import DataConfig, TeacherConfig
from cmt_core.data import Data, load_data
from cmt_core.edm_pickle import EDMNetwork, load_edm_network
from cmt_core.models import load_model


class ExactDenoiser(nn.Module):
    """The closed-form posterior mean of a synthetic distribution (float64 internally)."""

    def __init__(self, distribution):
        super().__init__()
        self.distribution = distribution

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device, dtype=torch.float64).expand(x.shape[0])
        return self.distribution.denoise(x.double(), t).to(x.dtype)


class ScriptedDenoiser(nn.Module):
    """Adapts a TorchScript ``D(x, sigma)`` to the teacher interface."""

    def __init__(self, scripted):
        super().__init__()
        self.scripted = scripted

    def forward(self, x, t):
        return self.scripted(x, torch.as_tensor(t, device=x.device, dtype=x.dtype).expand(x.shape[0]))


def load_teacher(cfg: TeacherConfig, distribution=None) -> nn.Module:
    """The teacher named by ``cfg`` for the sources read as they are: ``exact``, ``checkpoint``, ``torchscript``,
    ``callable`` (``pretrain`` is trained and ``edm_pickle`` converted by the teacher stage, ``cmt_core.stages``)."""
    if cfg.source == "exact":
        if distribution is None:
            raise ValueError("teacher.source='exact' needs a synthetic distribution with a closed-form denoiser")
        return ExactDenoiser(distribution)
    if cfg.source == "checkpoint":
        return load_model(cfg.path)
    if cfg.source == "torchscript":
        return ScriptedDenoiser(torch.jit.load(str(cfg.path), map_location="cpu")).eval()
    if cfg.source == "callable":
        module, name = cfg.target.split(":")
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
        teacher = obj()
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher.target {cfg.target!r} returned {type(teacher).__name__}, not an nn.Module")
        return teacher.eval()
    raise ValueError(f"teacher.source={cfg.source!r} is not loaded as it is: the teacher stage makes its model file")


def edm_teacher(cfg: TeacherConfig, sample_shape) -> EDMNetwork:
    """The EDM network pickle at ``cfg.path`` as our denoiser, checked to denoise samples of ``sample_shape``."""
    edm = load_edm_network(cfg.path)
    if edm.sample_shape != tuple(sample_shape):
        raise ValueError(f"the EDM network at {cfg.path} denoises samples of shape {edm.sample_shape}, "
                         f"the data has shape {tuple(sample_shape)}")
    return edm


def teacher_denoiser(cfg: TeacherConfig, data: Data, weights: Path) -> nn.Module:
    """The denoiser that solves the ODE: the model file at ``weights`` (the teacher artifact's) for ``pretrain``
    and ``edm_pickle``, otherwise ``load_teacher`` (the exact denoiser of ``data``, a file, a callable)."""
    if cfg.source in ("pretrain", "edm_pickle"):
        return load_model(weights)
    return load_teacher(cfg, data.distribution)


def rollout_denoiser(source: str, path: str | None, target: str | None, data_json: str, weights: str) -> nn.Module:
    """``teacher_denoiser`` from plain values: the picklable ``denoiser_factory`` a rollout worker calls
    (``functools.partial(rollout_denoiser, ...)``), so the teacher is built where it runs."""
    cfg = TeacherConfig(source=source, path=path, target=target, allow_code=source == "callable")  # allowed upstream
    return teacher_denoiser(cfg, load_data(DataConfig.model_validate_json(data_json)), Path(weights))

