"""Preflight: everything the stages to compute need from outside the config, checked once per entry point before
anything runs or is written.

``preflight(plan, stages)`` checks that the artifact root is a writable folder (or a reachable bucket, with a
writable mirror), that the device exists, that every file or folder a field names (``cmt_core.config.INPUT_FILES``)
exists and has the right kind for a stage that reads it, that the data reads, and that a teacher read from a file
or code loads and answers a probe ``D(x, sigma)`` of the data's shape. It raises ``PreflightError`` naming the
field, the value and what is allowed; stages whose artifact is complete need nothing and are skipped (the plan
remembers them, so they are not verified twice).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import torch

from cmt_core import object_storage as remote
from cmt_core.config import DATA_PATH_KIND, INPUT_FILES, DataConfig, TeacherConfig
from cmt_core.data import Data, load_data
from cmt_core.engine import Plan, complete_result
from cmt_core.errors import PreflightError, first_line
from cmt_core.runtime import uses_cuda
from cmt_core.teachers import LOADED, edm_teacher, load_teacher


def _check_folder(field: str, root: Path) -> None:
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise PreflightError(f"{field}={str(root)!r} is a file, not a folder; set {field} to a folder")
    existing = next(p for p in (root, *root.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PreflightError(f"{field}={str(root)!r} cannot be created or written ({existing} is not a "
                             f"writable folder); set {field} to a folder you can write")


@functools.lru_cache(maxsize=16)
def _check_url(url: str) -> None:
    """The bucket of an object-storage root answers (checked once per process; a probe, not a listing)."""
    hint = ("credentials and endpoint come from the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
            "AWS_ENDPOINT_URL")
    try:
        fs, path = remote.filesystem(url)
        found = fs.exists(path.split("/")[0])
    except Exception as err:  # no filesystem package, no server
        raise PreflightError(f"artifact_root={url!r} cannot be reached: {type(err).__name__}: {first_line(err)} "
                             f"({hint})") from err
    if not found:
        raise PreflightError(f"artifact_root={url!r} cannot be reached: its bucket does not exist or these "
                             f"credentials cannot read it ({hint})")


def check_root(cfg) -> None:
    """The artifact root is a folder this process can create and write (or a reachable bucket and a writable
    mirror)."""
    if cfg.remote_root is None:
        _check_folder("artifact_root", cfg.artifact_root)
        return
    _check_url(cfg.remote_root)
    _check_folder("cache_root", cfg.local_root)


def _probe_teacher(t: TeacherConfig, data: Data) -> None:
    """Load the teacher ``t`` names and ask it to denoise two zero samples at sigma = 1: it must answer a
    finite tensor of the samples' shape."""
    field, value = ("teacher.target", t.target) if t.source == "callable" else ("teacher.path", str(t.path))
    x = torch.zeros(2, *data.sample_shape)
    try:
        if t.source == "edm_pickle":
            net = edm_teacher(t.path, data.sample_shape).model
        else:
            net = load_teacher(t.source, t.path, t.target, data.distribution)
        with torch.no_grad():
            out = net(x, torch.ones(2))
    except Exception as err:  # any failure to load or run it is bad input, reported on one line
        raise PreflightError(f"{field}={value!r} cannot be used as the teacher (teacher.source={t.source!r}): "
                             f"{type(err).__name__}: {first_line(err)}") from err
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(x.shape) or not torch.isfinite(out).all():
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise PreflightError(f"{field}={value!r} is not a denoiser D(x, sigma) of this data: for x of shape "
                             f"{tuple(x.shape)} it answered {got}" + ("" if not isinstance(out, torch.Tensor) or
                                                                      torch.isfinite(out).all() else " (non-finite)"))


def _check_files(cfg, stage, name: str) -> None:
    """Every file or folder field the stage ``stage`` declares exists and has the kind it reads."""
    dumped = cfg.model_dump(mode="json")
    for path, kind in INPUT_FILES.items():
        value = dumped
        for key in path.split("."):
            value = value[key]
        if value is None or not stage.declares(path):
            continue
        kind = kind or DATA_PATH_KIND.get(cfg.data.name, "file")
        if not Path(value).exists():
            raise PreflightError(f"{path}={value!r} does not exist (the {name} stage reads it); "
                                 f"put the {kind} there or set {path} to where it is")
        if (kind == "dir") != Path(value).is_dir():
            raise PreflightError(f"{path}={value!r} is a {'folder' if Path(value).is_dir() else 'file'}, "
                                 f"the {name} stage needs a {'folder' if kind == 'dir' else 'file'} there")


def preflight(plan: Plan, stages) -> None:
    """Check, before anything runs or is written, what the ``stages`` to compute need from outside the config
    (module docstring); raises ``PreflightError``."""
    cfg = plan.cfg
    check_root(cfg)
    todo = [stage for stage in stages if complete_result(plan, stage) is None]
    if not todo:
        return
    if cfg.device == "cuda" and not uses_cuda("auto"):
        raise PreflightError("device='cuda' but this machine has no usable CUDA device (torch.cuda.is_available() "
                             "is False); set device=auto or device=cpu")
    for name in todo:
        _check_files(cfg, plan.stages[name], name)
        if name == "midtrain" and cfg.midtrain.distance == "lpips" and importlib.util.find_spec("lpips") is None:
            raise PreflightError("midtrain.distance='lpips' needs the lpips package: pip install 'cmt[fid]'")
    probe = cfg.teacher.source in LOADED and any(plan.stages[s].declares("teacher.source") for s in todo)
    _check_inputs(cfg.data.model_dump_json(), cfg.teacher.model_dump_json() if probe else None)


@functools.lru_cache(maxsize=16)
def _check_inputs(data_json: str, teacher_json: str | None) -> None:
    """Read the data and probe the teacher (``teacher_json`` None: no probe); each pair is checked once per
    process (entry points that check several configs share it), a failure every time."""
    data_cfg = DataConfig.model_validate_json(data_json)
    try:
        data = load_data(data_cfg)
    except Exception as err:  # an unreadable data file or folder
        raise PreflightError(f"data.path={str(data_cfg.path)!r} cannot be read as data.name={data_cfg.name!r}: "
                             f"{type(err).__name__}: {first_line(err)}") from err
    if teacher_json is not None:
        _probe_teacher(TeacherConfig.model_validate_json(teacher_json), data)
