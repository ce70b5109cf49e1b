"""Preflight: everything the stages to compute need from outside the config, and every setting that validates
but cannot run, checked once per entry point before anything runs or is written.

``preflight(plan, stages)`` raises ``PreflightError`` naming the field, the value and what is allowed (exit code
2). Stages whose artifact is complete need nothing and are skipped (the plan remembers them, so they are not
verified twice). It checks:

* paths (``check_path``): no NUL byte, every name within the file system's limit, no symbolic-link loop, not on a
  kernel file system (``/proc``, ``/sys``, ``/dev``...); the artifact root a folder this process can create and
  write, whose own folders (``logs``, ``features``, the stages') are folders if they exist; each file or folder a
  field names (``cmt_core.config.INPUT_FILES``) of the kind it is read as: a regular file (never a FIFO, a device
  or a socket, which are refused, not read) or a folder (an image folder's ``data.path``: a folder or a ``.zip``);
* the device exists;
* values (``check_values``): the solvers' noise-level grids finite, positive and strictly decreasing in float32,
  their squares finite (EDM's scalings square sigma); the evaluation's sigmas finite in float32; ECT's step
  1/q^(stage + 1) above float32's resolution for the whole run (else t - r rounds to 0);
* the data (``check_data``): it reads, its training split is not empty, and its held-out split holds at least 2
  samples to score against (or is empty on purpose, ``heldout_fraction=0``: scored against the training split, as
  the recipes' ``fid50k_full`` does); with ``data.num_classes`` > 0 every sample has a label in [0, num_classes);
* memory (``check_memory``): what the stages hold at once (a rollout shard and batch per worker, the trajectory
  loader's decoded chunks, the network with its EMA, optimizer and gradients, the evaluation's samples) against
  the memory this machine has available;
* files read by late stages, read now (``check_late_files``): the LPIPS backbone (a VGG16 state dict) and the
  Inception weights, loaded without running any code; the evaluation's ``eval.reference_stats``
  (``check_reference_stats``): statistics of the extractor's dimension, or images it can compare with the data's;
* a teacher (and an autoguidance guide) read from a file or code loads and answers a probe ``D(x, sigma)`` of the
  data's shape; a network of ours takes the data's classes.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import stat
import zipfile
from pathlib import Path

import torch

from cmt_core import object_storage as remote
from cmt_core.artifacts import FEATURES_DIR, LOGS_DIR, RESULTS_DIR
from cmt_core.checkpoint import load_file
from cmt_core.config import DATA_PATH_KIND, INPUT_FILES, DataConfig, GuideConfig, TeacherConfig
from cmt_core.data import POINT_DATA, Data, load_data, load_images
from cmt_core.data.datasets import ClassLabelError
from cmt_core.data.encoded import EDM2Latents, LatentStoreError
from cmt_core.data.images import pixel_shape
from cmt_core.encoders import model_shape_of, snapshot_encoder_problem, vae_folder_problem
from cmt_core.engine import Plan, complete_result
from cmt_core.errors import InputFileError, PreflightError, brief, describe
from cmt_core.evaluation.features import extractor_kind
from cmt_core.evaluation.reference import open_reference
from cmt_core.methods import get_method
from cmt_core.models import label_dim_of
from cmt_core.runtime import uses_cuda
from cmt_core.sit_checkpoint import sit_teacher
from cmt_core.teachers import LOADED, PROGRAMS, edm_teacher, load_teacher
from cmt_core.time_grids import make_grid

# file systems whose files are the kernel's, not data: never read, never written
KERNEL_FILE_SYSTEMS = ("proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "securityfs", "debugfs",
                       "tracefs", "configfs", "pstore", "bpf", "mqueue", "hugetlbfs", "fusectl", "efivarfs")
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
FLOAT32_EPS = float(torch.finfo(torch.float32).eps)
MEMORY_SHARE = 0.9  # of the memory available when preflight runs, what the stages may plan to hold
# the trajectory loader's decoded chunks in memory (``StorePairs``: buffer_chunks * (prefetch + 2))
LOADER_CHUNKS = 4 * 3


# ------------------------------------------------------------------------------------------------------ paths
@functools.lru_cache(maxsize=1)
def _mounts() -> tuple[tuple[str, str], ...]:
    """(mount point, file system type) of this machine, longest mount point first (Linux; elsewhere none)."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return ()
    mounts = [(line.split()[1].replace("\\040", " "), line.split()[2]) for line in lines if len(line.split()) > 2]
    return tuple(sorted(mounts, key=lambda m: len(m[0]), reverse=True))


def _file_system(path: Path) -> str | None:
    for point, kind in _mounts():
        if path == Path(point) or Path(point) in path.parents:
            return kind
    return None


def check_path(field: str, value, kind: str | None = None) -> Path:
    """The path ``value`` of ``field``, resolved, or ``PreflightError``: no NUL byte, names within the file
    system's limit, no link loop, not on a kernel file system; with ``kind`` ('file' | 'dir') it must exist and be
    a regular file (not a FIFO, device or socket) or a folder."""
    text = os.fspath(value)
    shown = f"{field}={brief(text)}"
    if "\x00" in text:
        raise PreflightError(f"{shown} holds a NUL byte, which no path can; set {field} to a real path")
    limit = os.pathconf("/", "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    long = next((part for part in Path(text).parts if len(os.fsencode(part)) > limit), None)
    if long is not None:
        raise PreflightError(f"{shown} has a name of {len(os.fsencode(long))} bytes, over the file system's limit "
                             f"of {limit}; set {field} to a shorter path")
    path, info = Path(text).absolute(), None
    for candidate in (path, *path.parents):  # the path, or the nearest part of it that exists, must resolve
        try:
            found = os.stat(candidate)
        except FileNotFoundError:
            if kind:
                raise PreflightError(f"{shown} does not exist; put the {kind} there or set {field} to where it "
                                     "is") from None
            continue
        except OSError as err:  # a link loop, a path too long, a file where a folder should be, no permission
            raise PreflightError(f"{shown} cannot be resolved: {describe(err)}; set {field} to a real path") from None
        info = found if candidate == path else None
        break
    if os.path.islink(path) and info is None:
        raise PreflightError(f"{shown} is a link to a place that does not exist; set {field} to a real path")
    if kind == "dir" and not stat.S_ISDIR(info.st_mode):
        raise PreflightError(f"{shown} is a {_kind_of(info.st_mode)}, not a folder; set {field} to a folder")
    if kind == "file" and not stat.S_ISREG(info.st_mode):
        raise PreflightError(f"{shown} is a {_kind_of(info.st_mode)}, not a regular file; it is not read")
    resolved = Path(os.path.realpath(path))
    system = _file_system(resolved)
    if system in KERNEL_FILE_SYSTEMS:
        raise PreflightError(f"{shown} is on the kernel's {system} file system ({resolved}), not storage; set "
                             f"{field} to a path on disk")
    return resolved


def _kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "folder"), (stat.S_ISREG, "file"), (stat.S_ISFIFO, "FIFO (named pipe)"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def _check_folder(field: str, root, own: tuple[str, ...]) -> None:
    """``root`` a folder this process can create and write, whose folders ``own`` are folders where they exist."""
    resolved = check_path(field, root)
    if resolved.exists() and not resolved.is_dir():
        raise PreflightError(f"{field}={brief(str(root))} is a {_kind_of(resolved.stat().st_mode)}, not a folder; "
                             f"set {field} to a folder")
    existing = next(p for p in (resolved, *resolved.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PreflightError(f"{field}={brief(str(root))} cannot be created or written ({existing} is not a "
                             f"writable folder); set {field} to a folder you can write")
    for name in own:
        inside = resolved / name
        if inside.exists() and not inside.is_dir():
            raise PreflightError(f"{field}={brief(str(root))} holds a {_kind_of(inside.stat().st_mode)} named "
                                 f"{name!r} where the pipeline keeps its {name} folder; move it away or choose "
                                 f"another {field}")


@functools.lru_cache(maxsize=16)
def _check_url(url: str) -> None:
    """The bucket of an object-storage root answers (checked once per process; a probe, not a listing)."""
    hint = ("credentials and endpoint come from the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
            "AWS_ENDPOINT_URL")
    try:
        fs, path = remote.filesystem(url)
        found = fs.exists(path.split("/")[0])
    except Exception as err:  # no filesystem package, no server
        raise PreflightError(f"artifact_root={url!r} cannot be reached: {describe(err)} ({hint})") from err
    if not found:
        raise PreflightError(f"artifact_root={url!r} cannot be reached: its bucket does not exist or these "
                             f"credentials cannot read it ({hint})")


def check_root(cfg, stages=()) -> None:
    """The artifact root is a folder this process can create and write, or a reachable bucket with a writable
    mirror; the folders the pipeline keeps there (its logs, features, Prefect results, the ``stages``') are
    folders where they exist."""
    own = (LOGS_DIR, FEATURES_DIR, RESULTS_DIR, *stages)
    if cfg.remote_root is None:
        _check_folder("artifact_root", cfg.artifact_root, own)
        return
    _check_url(cfg.remote_root)
    _check_folder("cache_root", cfg.local_root, own)


def _check_files(cfg, plan: Plan, todo: list[str]) -> None:
    """Every file or folder field a stage to compute declares exists and has the kind it is read as."""
    dumped = cfg.model_dump(mode="json")
    for path, kind in INPUT_FILES.items():
        value = dumped
        for key in path.split("."):
            value = value[key]
        readers = [s for s in todo if plan.stages[s].declares(path)]
        if path == "data.path":  # only stages that read samples open the data set
            readers = [s for s in readers if plan.stages[s].reads_samples(cfg)]
        if value is not None and readers:
            data_kind = DATA_PATH_KIND.get(cfg.data.name, "file") if path == "data.path" else None
            resolved = check_path(path, value, kind or data_kind)
            if path == "data.path" and cfg.data.name == "image_folder":
                _check_archive(path, value, resolved, "data.name='image_folder' reads a folder of PNG / JPEG images "
                               "or EDM dataset_tool's .zip")
            if path == "data.encoder.edm2_encoded":
                _check_archive(path, value, resolved, "it is read as EDM2 dataset_tool.py encode's output")
                try:
                    EDM2Latents(resolved, cfg.data.num_classes)
                except (LatentStoreError, OSError, ValueError, zipfile.BadZipFile) as err:
                    raise PreflightError(f"{path}={brief(str(value))}: {describe(err)}") from err
            if path == "data.encoder.path" and cfg.data.encoder.kind == "sd_vae":
                problem = vae_folder_problem(resolved)
                if problem:
                    raise PreflightError(f"{path}={brief(str(value))} {problem}")


def _check_archive(field: str, value, resolved: Path, reader: str) -> None:
    """A folder-or-archive field (``resolved`` by ``check_path``) is a folder or a regular ``.zip`` file."""
    shown = f"{field}={brief(str(value))}"
    if not resolved.exists():
        raise PreflightError(f"{shown} does not exist; put the folder or .zip archive there or set {field} to where "
                             "it is")
    mode = resolved.stat().st_mode
    if not stat.S_ISDIR(mode) and not (stat.S_ISREG(mode) and resolved.suffix.lower() == ".zip"):
        raise PreflightError(f"{shown} is a {_kind_of(mode)}, not a folder or a .zip archive; {reader}")


# ----------------------------------------------------------------------------------------------------- values
def _check_grid(field: str, solver) -> None:
    """A solver's grid (a ``SolverConfig`` at ``field``): finite, positive and strictly decreasing in float32 (a
    final 0 aside), its squares finite."""
    grid = make_grid(solver)
    points = grid[:-1] if solver.to_zero else grid
    low = points.float()
    where = f"{field}: sigma_min={solver.sigma_min:g}, sigma_max={solver.sigma_max:g}, steps={solver.steps}"
    if not torch.isfinite(low).all() or not torch.isfinite(low.square()).all():
        raise PreflightError(f"{where} gives noise levels whose squares overflow float32 (sigma up to "
                             f"{math.sqrt(FLOAT32_MAX):.3g}); lower {field}.sigma_max")
    if (low <= 0).any():
        raise PreflightError(f"{where} gives noise levels that round to 0 in float32; raise {field}.sigma_min")
    if not (low[1:] < low[:-1]).all():
        raise PreflightError(f"{where} gives noise levels that coincide in float32; widen the range or take fewer "
                             f"{field}.steps")


def check_values(cfg, todo: list[str]) -> None:
    """Settings that validate one by one but cannot run together (module docstring)."""
    _check_grid("rollout.solver", cfg.rollout.solver)
    if "evaluation" in todo:
        sampler = cfg.teacher.sampler.model_copy(update={"sigma_max": cfg.rollout.solver.sigma_max})
        _check_grid("teacher.sampler", sampler)
    for field, sigma in (("eval.mid_sigma", cfg.eval.mid_sigma),
                         *((f"eval.mid_sigma_search[{k}]", s) for k, s in enumerate(cfg.eval.mid_sigma_search))):
        if not math.isfinite(sigma * sigma) or sigma * sigma > FLOAT32_MAX:
            raise PreflightError(f"{field}={sigma:g} overflows float32 when squared; choose a sigma below "
                                 f"{cfg.rollout.solver.sigma_max:g}")
    e, p = cfg.posttrain.ect, cfg.posttrain
    if "posttrain" in todo and get_method(p.method).section == "posttrain.ect":
        last = e.start_stage + p.train.steps // e.stage_steps + 1
        step = math.exp(-last * math.log(e.q))
        if step < FLOAT32_EPS:
            raise PreflightError(f"posttrain.ect: the step 1/q^(stage + 1) = {e.q:g}^-{last} = {step:.3g} at the "
                                 f"run's last stage is below float32's resolution ({FLOAT32_EPS:.3g}), where t - r "
                                 f"rounds to 0; lower posttrain.ect.q or start_stage, or raise stage_steps")


def check_data(data_cfg, data: Data) -> None:
    """The splits the stages read are not empty (module docstring)."""
    where = f"data.name={data_cfg.name!r}" + (f" at data.path={brief(str(data_cfg.path))}" if data_cfg.path else "")
    total = len(data.train) + len(data.heldout)
    if total == 0:
        raise PreflightError(f"{where} holds no samples; point data.path at a non-empty data set")
    if len(data.train) == 0:
        raise PreflightError(f"data.heldout_fraction={data_cfg.heldout_fraction:g} holds out all {total} samples of "
                             f"{where}, leaving none to train on; lower it")
    if data_cfg.heldout_fraction > 0 and len(data.heldout) < 2:
        raise PreflightError(f"data.heldout_fraction={data_cfg.heldout_fraction:g} holds out {len(data.heldout)} of "
                             f"the {total} samples of {where}; scoring needs at least 2; raise it, or set it to 0 "
                             "to score against the training split")


def available_memory() -> int | None:
    """Bytes of memory this machine has available now (``MemAvailable``), or None where that cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _parameters(cfg, sample_shape) -> int:
    """The parameters of the training stages' network (built on the meta device: nothing is allocated)."""
    from cmt_core.models import build_model

    with torch.device("meta"):
        model = build_model("flow_map", cfg.network.model_dump(mode="json"), sample_shape, 0.002)
    return sum(p.numel() for p in model.parameters())


def check_memory(cfg, todo: list[str], sample_shape, available: int | None = None) -> None:
    """What the stages to compute hold at once, against the memory available (module docstring). Each need is
    charged to the field that sets it; the largest one is named."""
    available = available_memory() if available is None else available
    if not available:
        return
    floats = 4 * math.prod(sample_shape)  # bytes of one float32 sample
    r, s = cfg.rollout, cfg.rollout.store
    states = len(s.keep_indices) if s.keep_indices else r.solver.steps + 1
    needs = {}
    if "rollouts" in todo:  # per local worker: its batch's states (and the solver's temporaries), its whole shard
        workers = 1 if r.cluster.address else r.cluster.workers
        per = (3 * r.batch_size * (r.solver.steps + 1) + 2 * s.chunk_trajectories * s.shard_chunks * states) * floats
        needs["rollout.batch_size / rollout.store.chunk_trajectories x shard_chunks"] = workers * per
    if "midtrain" in todo:
        needs["rollout.store.chunk_trajectories"] = LOADER_CHUNKS * s.chunk_trajectories * states * floats
    if any(stage in todo for stage in ("teacher", "midtrain", "posttrain")):
        needs["network (its width and depth)"] = 5 * 4 * _parameters(cfg, sample_shape)  # model, EMA, grad, Adam x2
    if any(stage in todo for stage in ("midtrain", "posttrain", "evaluation")):
        needs["eval.num_samples"] = 4 * cfg.eval.num_samples * floats  # the noises, samples, decoded, features
    if not needs:
        return
    field, most = max(needs.items(), key=lambda kv: kv[1])
    if sum(needs.values()) > MEMORY_SHARE * available:
        raise PreflightError(f"the stages would hold about {sum(needs.values()) / 2**30:.3g} GiB at once, "
                             f"{most / 2**30:.3g} GiB of it set by {field}, and this machine has "
                             f"{available / 2**30:.3g} GiB available; lower {field}")


# -------------------------------------------------------------------------------------------------- late files
def check_late_files(cfg, todo: list[str]) -> None:
    """The files late stages read, read now as those stages will (without running any code): a wrong file fails
    here, not hours into a run."""
    m = cfg.midtrain
    if "midtrain" in todo and m.distance in ("lpips", "elatent_lpips"):
        if m.distance == "lpips" and importlib.util.find_spec("lpips") is None:
            raise PreflightError("midtrain.distance='lpips' needs the lpips package: pip install 'cmt[fid]'")
        from cmt_core.objectives.distances import make_distance

        network = "VGG16" if m.distance == "lpips" else "latent VGG16"
        try:
            make_distance(m.distance, lpips_backbone=m.lpips_backbone)
        except Exception as err:  # a damaged, foreign or code-running file
            raise PreflightError(f"midtrain.lpips_backbone={brief(str(m.lpips_backbone))} is not a usable {network} "
                                 f"weights file: {describe(err)}") from err
    path = cfg.eval.inception_path
    if path is not None and any(stage in todo for stage in ("midtrain", "posttrain", "evaluation")):
        if importlib.util.find_spec("cleanfid") is None:
            raise PreflightError("eval.inception_path needs clean-fid: pip install 'cmt[fid]'")
        from cmt_core.evaluation.inception import FEATURE_DIM, InceptionFeatures

        try:
            shape = InceptionFeatures(path, cfg.eval.fid_mode)(torch.zeros(1, 3, 16, 16)).shape
        except Exception as err:  # a damaged or foreign file, or one of another architecture
            raise PreflightError(f"eval.inception_path={brief(str(path))} is not usable Inception weights for "
                                 f"eval.fid_mode={cfg.eval.fid_mode!r}: {describe(err)}") from err
        if tuple(shape) != (1, FEATURE_DIM):
            raise PreflightError(f"eval.inception_path={brief(str(path))} gives features of shape {tuple(shape)}, "
                                 f"not (1, {FEATURE_DIM}): not clean-fid's Inception")


def check_reference_stats(cfg, todo: list[str], sample_shape: tuple[int, ...]) -> None:
    """``eval.reference_stats``, when the evaluation is computed: a regular file or a folder (``check_path``), read
    as the evaluation will read it but without computing anything (``reference.open_reference``): a mu/sigma ``.npz``
    of the dimension of the extractor's features for samples of ``sample_shape`` (C, H, W), finite, or images the
    extractor can compare with those samples; image data only."""
    path = cfg.eval.reference_stats
    if path is None or "evaluation" not in todo:
        return
    field = "eval.reference_stats"
    resolved = check_path(field, path, "dir" if os.path.isdir(path) else "file")
    try:
        kind = extractor_kind(cfg.data.name, cfg.eval)
    except ValueError as err:  # 2-D points
        raise PreflightError(f"{field}={brief(str(path))}: {err}; set it only for image data") from err
    try:
        open_reference(resolved, field, kind, sample_shape)
    except InputFileError as err:
        raise PreflightError(str(err)) from err


# ------------------------------------------------------------------------------------------------------- all
def _probe_denoiser(section: str, source: str, path, target: str | None, data_cfg, shape: tuple[int, ...]) -> None:
    """Load the denoiser a ``section`` ('teacher', 'guidance.guide') names and ask it to denoise two zero samples of
    the model's ``shape`` at sigma = 1: it must answer a finite tensor of that shape, and a network of ours must
    take the data's classes (as many, or none for unconditional data)."""
    field, value = (f"{section}.target", target) if source == "callable" else (f"{section}.path", str(path))
    x = torch.zeros(2, *shape)
    try:
        if source == "edm_pickle":
            edm = edm_teacher(path, shape)
            problem = snapshot_encoder_problem(getattr(edm, "encoder", None), data_cfg.encoder)
            if problem:
                raise PreflightError(f"{field}={brief(value)}: the network {problem}")
            net = edm.model
        elif source == "sit":
            net = sit_teacher(path, shape, data_cfg.num_classes).model
        elif source == "checkpoint":
            blob = load_file(path)
            recorded = tuple(blob.get("sample_shape") or ()) if isinstance(blob, dict) else ()
            if recorded and recorded != tuple(shape):
                space = "latents" if data_cfg.encoder.kind != "identity" else "samples"
                raise PreflightError(f"{field}={brief(value)} denoises samples of its sample_shape {recorded}; the "
                                     f"model's {space} are {tuple(shape)}")
            net = load_teacher(source, path, target, None)
        else:
            distribution = load_data(data_cfg).distribution if data_cfg.name in POINT_DATA else None
            net = load_teacher(source, path, target, distribution)
        with torch.no_grad():
            out = net(x, torch.ones(2))
    except PreflightError:
        raise
    except Exception as err:  # any failure to load or run it is bad input, reported on one line
        raise PreflightError(f"{field}={brief(value)} cannot be used as the {section.split('.')[-1]} ({section}."
                             f"source={source!r}): {describe(err)}") from err
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(x.shape) or not torch.isfinite(out).all():
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise PreflightError(f"{field}={brief(value)} is not a denoiser D(x, sigma) of this data: for x of shape "
                             f"{tuple(x.shape)} it answered {got}" + ("" if not isinstance(out, torch.Tensor) or
                                                                      torch.isfinite(out).all() else " (non-finite)"))
    classes = label_dim_of(net)
    if source not in PROGRAMS and classes != data_cfg.num_classes:
        what = f"is conditioned on {classes} classes" if classes else "is unconditional"
        raise PreflightError(f"{field}={brief(value)}: the network {what}, but data.num_classes="
                             f"{data_cfg.num_classes}")


def preflight(plan: Plan, stages) -> None:
    """Check, before anything runs or is written, what the ``stages`` to compute need (module docstring);
    raises ``PreflightError``."""
    cfg = plan.cfg
    check_root(cfg, tuple(plan.stages))
    todo = [stage for stage in stages if complete_result(plan, stage) is None]
    if not todo:
        return
    if cfg.device == "cuda" and not uses_cuda("auto"):
        raise PreflightError("device='cuda' but this machine has no usable CUDA device (torch.cuda.is_available() "
                             "is False); set device=auto or device=cpu")
    if cfg.data.encoder.kind == "identity" and {"encoder", "encode"} & set(todo):
        raise PreflightError("data.encoder.kind='identity': the data is the model's space, there is nothing to encode "
                             "(set data.encoder.kind to sd_vae or trained)")
    _check_files(cfg, plan, todo)
    check_values(cfg, todo)
    probe = cfg.teacher.source in LOADED and any(plan.stages[s].declares("teacher.source") for s in todo)
    guide = cfg.guidance.guide.source != "pretrain" and "guide" in todo
    samples = any(plan.stages[s].reads_samples(cfg) for s in todo)
    sample_shape, model_shape = _check_inputs(cfg.data.model_dump_json(), cfg.teacher.model_dump_json() if probe
                                              else None, cfg.guidance.guide.model_dump_json() if guide else None,
                                              samples)
    check_memory(cfg, todo, model_shape)
    check_late_files(cfg, todo)
    check_reference_stats(cfg, todo, sample_shape)


@functools.lru_cache(maxsize=16)
def _check_inputs(data_json: str, teacher_json: str | None, guide_json: str | None = None, samples: bool = True
                  ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Read the data (``check_data``; with ``samples`` False, for stages that read no sample of it, only a latent
    space's shapes from the config) and probe the teacher and the guide read from files (``teacher_json`` /
    ``guide_json`` None: no probe); returns (the sample shape, the model's: the latents' in a latent space). Each
    combination is checked once per process (entry points that check several configs share it), a failure every
    time."""
    data_cfg = DataConfig.model_validate_json(data_json)
    data = None
    try:
        if samples or data_cfg.encoder.kind == "identity":
            data = load_images(data_cfg) if data_cfg.encoder.kind != "identity" else load_data(data_cfg)
    except ClassLabelError as err:  # labels missing or out of range: the message names data.num_classes
        raise PreflightError(str(err)) from err
    except Exception as err:  # an unreadable data file or folder
        raise PreflightError(f"data.path={brief(str(data_cfg.path))} cannot be read as data.name="
                             f"{data_cfg.name!r}: {describe(err)}") from err
    try:
        if data is not None:
            check_data(data_cfg, data)
        sample_shape = data.sample_shape if data is not None else pixel_shape(data_cfg)
        shape = model_shape_of(data_cfg.encoder, sample_shape)
    except (InputFileError, ValueError) as err:
        raise PreflightError(str(err)) from err
    if teacher_json is not None:
        t = TeacherConfig.model_validate_json(teacher_json)
        _probe_denoiser("teacher", t.source, t.path, t.target, data_cfg, shape)
    if guide_json is not None:
        g = GuideConfig.model_validate_json(guide_json)
        _probe_denoiser("guidance.guide", g.source, g.path, None, data_cfg, shape)
    return sample_shape, shape
