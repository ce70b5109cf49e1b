"""The stage graph, declared once: teacher -> rollouts -> mid-training -> post-training -> evaluation.

Each ``Stage`` declares the config fields it ``reads`` (they decide its output, so they are its identity),
the fields it only ``uses`` (batch sizes for speed, where files live, the dask cluster: they never change
its output) and the stages it ``needs``. Everything else derives from that declaration:

* ``plan(cfg)``: each stage's artifact id = hash(stage, its ``reads`` values, its inputs' ids, format),
  its input ids, in dependency order; ``stage_path``; ``stages_needed`` (what a target requires);
* a stage's body sees the config through a ``ConfigView`` restricted to ``reads + uses``: reading any
  other field raises ``UndeclaredRead``, so an id can never miss a field its stage reads;
* ``run_stage(cfg, name)`` is the one place that decides whether a stage is done: it returns the complete
  artifact at ``<artifact_root>/<stage>/<id>/`` (manifest present) at once, otherwise computes it in that
  folder (training stages resume from their checkpoints) and writes the manifest last.

``run_pipeline(cfg)`` runs every stage in order; orchestrators (``tasks/``, ``flows/``, torchrun) call
``run_stage`` one stage at a time.

Reliability: a complete artifact is reused only when every file its manifest records is intact
(``cmt_core.artifacts.verify_files``), otherwise it is recomputed in place; one process at a time computes an
artifact (``artifact_lock``: an identical run waits, then reuses it); ``preflight`` checks the whole config
(files, probes of the teacher, the device, the artifact root) before anything runs or is written; a failure
while a stage computes is raised as ``StageError`` naming the stage, its folder and the next step.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cmt_core import object_storage as remote
from cmt_core.artifacts import (
    MANIFEST,
    STORE_DIR,
    artifact_dir,
    artifact_id,
    artifact_lock,
    read_manifest,
    verify_files,
    write_manifest,
)
from cmt_core.checkpoint import read_training_log
from cmt_core.config import DataConfig, NetworkConfig, PipelineConfig, RolloutConfig, TeacherConfig, TrainConfig
from cmt_core.data import Data, load_data
from cmt_core.evaluation.evaluator import Evaluator
from cmt_core.evaluation.scoring import Scorer
from cmt_core.evaluation.table import ScoredModel, results_table
from cmt_core.models import build_model, init_from, load_model, save_model
from cmt_core.objectives.cmt import CMTLoss
from cmt_core.objectives.distances import make_distance
from cmt_core.objectives.ect import ECTLoss
from cmt_core.objectives.edm import EDMLoss
from cmt_core.objectives.meanflow import MeanFlowLoss
from cmt_core.runtime import Runtime, effective_precision, uses_cuda
from cmt_core.teachers import edm_teacher, load_teacher, rollout_denoiser, teacher_denoiser
from cmt_core.training import Progress, train
from cmt_core.trajectories.dask_rollouts import run_rollouts
from cmt_core.trajectories.pairs import StorePairs
from cmt_core.trajectories.store import open_store, reset_shards, store_exists, verify_store

log = logging.getLogger("cmt")
MODEL_FILE = "model.pt"
MIDTRAIN_KIND = {"cm": "consistency", "mf": "flow_map", "flow_map": "flow_map"}
POSTTRAIN_KIND = {"ect": "consistency", "ecd": "consistency", "meanflow": "flow_map"}


class PreflightError(ValueError):
    """A file or folder the config names for a stage to compute does not exist (found before any stage runs)."""


class InputFileError(ValueError):
    """A file the config names cannot be used (found when the stage reads it); the message names the field."""


class StageError(RuntimeError):
    """A stage failed while computing: the message names the stage, its artifact folder, the cause and the
    next step; nothing was marked complete and a rerun resumes from the stage's checkpoints."""


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


class UndeclaredRead(RuntimeError):
    """A stage read a config field that its declaration in ``cmt_core.stages`` does not list."""


class ConfigView:
    """Read-only view of a config restricted to dotted paths: a listed path gives the real value, a prefix
    of one gives a narrower view, anything else raises ``UndeclaredRead``."""

    __slots__ = ("_node", "_prefix", "_allowed", "_stage")

    def __init__(self, node, allowed: tuple[str, ...], stage: str, prefix: str = ""):
        self._node, self._allowed, self._stage, self._prefix = node, allowed, stage, prefix

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        path = self._prefix + name
        value = getattr(self._node, name)
        if any(path == a or path.startswith(a + ".") for a in self._allowed):
            return value
        if any(a.startswith(path + ".") for a in self._allowed):
            return ConfigView(value, self._allowed, self._stage, path + ".")
        raise UndeclaredRead(f"stage {self._stage!r} reads the config field {path!r}, which its declaration in "
                             f"cmt_core/stages.py does not list (reads or uses)")

    def __repr__(self) -> str:
        return f"ConfigView({self._stage!r}, {self._prefix or '<root>'})"


@dataclass
class StageContext:
    """What a stage body gets: its config view, its artifact folder, its inputs' folders, where it runs.

    ``path`` and ``inputs`` are local folders holding the artifacts' files; ``location`` and ``input_locations``
    are where the artifacts are published, the same folders under a local root and URLs under an object-storage
    root (``cmt_core.object_storage``: the trajectory store is read and written there, in place)."""

    stage: str
    cfg: ConfigView
    path: Path
    inputs: dict[str, Path]
    runtime: Runtime
    location: Path | str
    input_locations: dict[str, Path | str]
    local_root: Path  # this machine's working root (feature caches)
    progress: Progress | None = None

    def input(self, stage: str) -> Path:
        return self.inputs[stage]

    def store(self, stage: str | None = None) -> Path | str:
        """The trajectory store of the input artifact ``stage``, or of this artifact (None)."""
        return remote.join(self.location if stage is None else self.input_locations[stage], STORE_DIR)


@dataclass(frozen=True)
class Stage:
    name: str
    reads: tuple[str, ...]  # dotted config paths that decide the output: the stage's identity
    needs: Callable[[PipelineConfig], tuple[str, ...]]  # the stages whose artifacts it reads
    work: Callable[[StageContext], dict]  # computes the artifact in ctx.path; returns the manifest's metrics
    uses: tuple[str, ...] = ()  # dotted config paths read that never change the output
    trains: bool = False  # a training loop (may run on several DDP processes)


@dataclass
class StageResult:
    """A complete artifact: its files in the local folder ``path``; ``location``, where it is published (the same
    folder under a local root, a URL under an object-storage root)."""

    stage: str
    artifact_id: str
    path: Path
    manifest: dict
    cached: bool
    location: Path | str | None = None

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})


# ------------------------------------------------------------------------------------------- stage bodies


def _scorer(ctx: StageContext, data: Data) -> Scorer:
    c = ctx.cfg
    evaluator = Evaluator(data, c.eval, ctx.local_root / "features", c.data)
    return Scorer(data, c.eval, evaluator, ctx.runtime.device, c.rollout.solver.sigma_max, c.rollout.solver.sigma_min)


def _teacher_weights(ctx: StageContext) -> torch.nn.Module:
    path = ctx.input("teacher") / MODEL_FILE
    if not path.exists():
        raise ValueError(f"teacher.source={ctx.cfg.teacher.source!r} has no network weights to initialise from; "
                         "use init='random' or a checkpoint teacher")
    return load_model(path)


def _denoiser_network(c: ConfigView) -> NetworkConfig:
    """The network config of the teacher's model file, from the network fields the teacher reads."""
    return NetworkConfig(**{path.split(".")[1]: getattr(c.network, path.split(".")[1]) for path in DENOISER_NETWORK})


def _teacher(ctx: StageContext) -> dict:
    """The teacher's network weights (``model.pt``): EDM pre-training, a loaded checkpoint, or an EDM network
    pickle converted once (later stages load ``model.pt``, never the pickle).

    With the exact 2-D teacher, rollouts use the closed-form denoiser and the weights pre-trained here are
    what 'teacher initialisation' starts from. TorchScript / callable teachers have no weights of ours."""
    c, runtime = ctx.cfg, ctx.runtime
    if c.teacher.source in ("torchscript", "callable"):
        return {"weights": False}
    data = load_data(c.data)
    if c.teacher.source == "checkpoint":
        model = load_teacher(c.teacher)
        if runtime.is_main:
            save_model(ctx.path / MODEL_FILE, model, "denoiser", _denoiser_network(c), data.sample_shape)
        return {"weights": True}
    if c.teacher.source == "edm_pickle":
        try:
            edm = edm_teacher(c.teacher, data.sample_shape)
        except (pickle.UnpicklingError, ValueError, OSError, EOFError) as err:
            raise InputFileError(f"teacher.path={str(c.teacher.path)!r} is not a usable EDM network pickle: "
                                 f"{_first_line(err)}") from err
        if runtime.is_main:
            save_model(ctx.path / MODEL_FILE, edm.model, "denoiser", edm.network, edm.sample_shape)
        return {"weights": True, "edm_class": edm.precond_class}
    torch.manual_seed(c.teacher.train.seed)  # the initial weights, like every other random number, from a seed
    model = build_model("denoiser", c.network, data.sample_shape)
    loss = EDMLoss(c.teacher.p_mean, c.teacher.p_std, c.network.sigma_data)
    result = train(model, loss, data.source(c.teacher.train.seed), c.teacher.train, ctx.path / "train", runtime,
                   desc="teacher", progress=ctx.progress)
    if runtime.is_main:
        save_model(ctx.path / MODEL_FILE, result.model, "denoiser", _denoiser_network(c), data.sample_shape)
    return {"weights": True, "final_loss": result.history[-1]["loss"] if result.history else None}


def _solve_rollouts(c, store, teacher: Path, progress=None) -> None:
    """Fill (or finish) the store at ``store`` with the trajectories ``c`` (a config or a ``ConfigView``)
    describes, solved by the teacher whose artifact folder is ``teacher``."""
    data = load_data(c.data)
    factory = functools.partial(rollout_denoiser, c.teacher.source, c.teacher.path and str(c.teacher.path),
                                c.teacher.target, c.data.model_dump_json(), str(teacher / MODEL_FILE))
    r = c.rollout
    rollout = RolloutConfig(solver=r.solver, num_trajectories=r.num_trajectories, batch_size=r.batch_size,
                            seed=r.seed, store=r.store, cluster=r.cluster)
    run_rollouts(factory, store, r.num_trajectories, data.sample_shape, rollout, teacher_id=teacher.name,
                 progress=progress)


def _forget_bad_shards(store) -> list[int]:
    """Reset the shards of a store marked complete that fail ``verify_store`` (damaged or missing chunks), so
    that the rollouts recompute them from their seeds; returns them. A store still being written is left alone."""
    if not store_exists(store) or not open_store(store, partial=True).complete:
        return []
    report = verify_store(store)
    bad = sorted(set(report.bad_shards) | set(report.missing_shards))
    if bad:
        log.warning("rollouts: %s has %d bad or missing shards %s; recomputing them", store, len(bad), bad[:10])
        reset_shards(store, bad)
    return bad


def _rollouts(ctx: StageContext) -> dict:
    """Teacher ODE trajectories in a zarr store (``store.zarr``, at the artifact's location: in place at a URL),
    solved shard by shard (dask when installed). A store that was complete but fails verification (the stage is
    recomputed) has its bad shards recomputed."""
    c = ctx.cfg
    if ctx.runtime.is_main:
        progress = None if ctx.progress is None else (lambda done, total: ctx.progress(done, total, {}))
        _forget_bad_shards(ctx.store())
        _solve_rollouts(c, ctx.store(), ctx.input("teacher"), progress)
    return {"num_trajectories": c.rollout.num_trajectories, "time_points": c.rollout.solver.steps + 1,
            "store": STORE_DIR}


def _config_of(values: dict) -> PipelineConfig:
    """A pipeline config holding the dotted ``values`` of a manifest's ``config`` (the rest: defaults)."""
    nested: dict = {}
    for path, value in values.items():
        *parents, leaf = path.split(".")
        node = nested
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    if nested.get("teacher", {}).get("source") == "callable":  # it ran before, under allow_code
        nested["teacher"]["allow_code"] = True
    return PipelineConfig.model_validate(nested)


def repair_store(store: Path) -> list[int]:
    """Recompute the bad or missing shards of the store of a rollouts artifact (``<root>/rollouts/<id>/store.zarr``)
    from their seeds, under the artifact's lock, and publish the artifact again; returns the shards recomputed.

    The teacher and the rollout settings come from the artifact's manifest and its teacher artifact, so the
    recomputed shards equal the lost ones."""
    if remote.is_url(store):
        raise ValueError(f"{store}: --repair works on a local store; for one on object storage rerun the pipeline "
                         "after removing the rollouts manifest: the stage recomputes only the bad shards")
    store = Path(store)
    folder = store.parent
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("stage") != "rollouts":
        raise ValueError(f"{store} is not the store of a complete rollouts artifact (no rollouts manifest in "
                         f"{folder}): --repair recomputes shards from that manifest; rerun the rollouts stage instead")
    teacher = folder.parent.parent / "teacher" / manifest["inputs"]["teacher"]
    if read_manifest(teacher) is None:
        raise ValueError(f"{store}: its teacher artifact {teacher} is not complete; rerun the teacher stage first")
    c = _config_of(manifest["config"])
    with artifact_lock(folder, f"rollouts: another process is writing {folder}; waiting"):
        (folder / MANIFEST).unlink(missing_ok=True)  # incomplete while it is repaired
        bad = _forget_bad_shards(store)
        _solve_rollouts(c, store, teacher)
        report = verify_store(store)
        if not report.ok:
            raise StageError(f"rollouts: {store} still fails verification after the repair: {report.summary()}")
        write_manifest(folder, "rollouts", manifest["artifact_id"], manifest["config"], manifest["inputs"],
                       manifest["metrics"], manifest["seconds"], manifest.get("device"))
    return bad


def _midtrain(ctx: StageContext) -> dict:
    """Consistency mid-training on the rollouts; keeps the EMA model ``train.keep`` selects (``model.pt``)."""
    c = ctx.cfg
    data = load_data(c.data)
    kind = MIDTRAIN_KIND[c.midtrain.form]
    torch.manual_seed(c.midtrain.train.seed)
    model = build_model(kind, c.network, data.sample_shape, c.rollout.solver.sigma_min)
    if c.midtrain.init == "teacher":
        init_from(model, _teacher_weights(ctx))
    source = StorePairs(ctx.store("rollouts"), to_end=c.midtrain.form == "cm", seed=c.midtrain.train.seed)
    m = c.midtrain
    try:
        distance = make_distance(m.distance, m.huber_c, m.lpips_backbone)
    except (ValueError, OSError, RuntimeError, pickle.UnpicklingError) as err:
        raise InputFileError(f"midtrain.lpips_backbone={str(m.lpips_backbone)!r} is not a usable VGG16 weights "
                             f"file: {_first_line(err)}") from err
    loss = CMTLoss(m.form, distance)
    return _train_few_step(ctx, data, model, kind, loss, source, c.midtrain.train, "mid-training")


def _train_few_step(ctx: StageContext, data: Data, model, kind: str, loss, source, train_cfg, desc: str) -> dict:
    """Train a few-step model, scored at 1 and 2 steps every ``train_cfg.eval_every`` steps, and save the EMA
    model ``train_cfg.keep`` selects; the manifest records its scores and its 2-step sigma (``mid_sigma``)."""
    scorer = _scorer(ctx, data)
    result = train(model, loss, source, train_cfg, ctx.path / "train", ctx.runtime,
                   evaluate=scorer.training_evaluate(kind) if train_cfg.eval_every else None,
                   desc=desc, progress=ctx.progress)
    if ctx.runtime.is_main:
        save_model(ctx.path / MODEL_FILE, result.model, kind, ctx.cfg.network, data.sample_shape)
    kept = result.best_metrics
    mid_sigma = kept["mid_sigma"] if "mid_sigma" in kept else scorer.mid_sigma_for(kind, result.model)
    return {"best_step": result.best_step, "keep": train_cfg.keep if train_cfg.eval_every else "last",
            "score_names": [scorer.primary, scorer.primary_2step], "score_1step": kept.get("score_1step"),
            "score_2step": kept.get("score_2step"), "mid_sigma": mid_sigma}


def _posttrain(ctx: StageContext) -> dict:
    """ECT / ECD / Mean Flow from the chosen initialisation; keeps the EMA model ``train.keep`` selects."""
    c, runtime = ctx.cfg, ctx.runtime
    data = load_data(c.data)
    p, kind = c.posttrain, POSTTRAIN_KIND[c.posttrain.method]
    smin, smax = c.rollout.solver.sigma_min, c.rollout.solver.sigma_max
    torch.manual_seed(p.train.seed)
    if p.init == "cmt":
        model = load_model(ctx.input("midtrain") / MODEL_FILE).train()
    else:
        model = build_model(kind, c.network, data.sample_shape, smin)
        if p.init == "teacher":
            init_from(model, _teacher_weights(ctx))
    if p.method == "meanflow":
        loss = MeanFlowLoss(p.meanflow, smin, smax)
    else:
        teacher = None
        if p.method == "ecd":
            teacher = teacher_denoiser(c.teacher, data, ctx.input("teacher") / MODEL_FILE).to(runtime.device).eval()
        anchor = None
        if p.ect.anchor_sigma > 0:  # a frozen copy of the mid-trained model (config: init='cmt')
            anchor = load_model(ctx.input("midtrain") / MODEL_FILE).to(runtime.device)
        loss = ECTLoss(p.ect, smin, smax, teacher, p.ecd_solver, anchor)
    return _train_few_step(ctx, data, model, kind, loss, data.source(p.train.seed), p.train, "post-training")


def _evaluation(ctx: StageContext) -> dict:
    """The results table: data floor, teacher at its NFE, CMT and post-trained models at 1 and 2 steps."""
    c, runtime = ctx.cfg, ctx.runtime
    if not runtime.is_main:
        return {}
    data = load_data(c.data)
    smin, smax = c.rollout.solver.sigma_min, c.rollout.solver.sigma_max
    first = _scorer(ctx, data)
    scorers = [first] + [Scorer(data, c.eval, first.evaluator, runtime.device, smax, smin, seed_set=k)
                         for k in range(1, c.eval.num_seed_sets)]
    weights = ctx.input("teacher") / MODEL_FILE
    teacher = teacher_denoiser(c.teacher, data, weights).to(runtime.device).eval()
    solver = c.teacher.sampler.model_copy(update={"sigma_max": smax})
    mid_kind, post_kind = MIDTRAIN_KIND[c.midtrain.form], POSTTRAIN_KIND[c.posttrain.method]
    baseline = None
    if weights.exists():
        untrained = init_from(build_model(mid_kind, c.network, data.sample_shape, smin), load_model(weights))
        baseline = ScoredModel("teacher-initialised, untrained", "baseline", mid_kind, untrained.to(runtime.device))
    def kept(stage: str) -> tuple[torch.nn.Module, float]:
        """A training stage's model and its 2-step sigma (chosen by the stage, ``_train_few_step``)."""
        model = load_model(ctx.input(stage) / MODEL_FILE).to(runtime.device)
        return model, read_manifest(ctx.input(stage))["metrics"]["mid_sigma"]

    trained = [ScoredModel("CMT (mid-trained)", "midtrain", mid_kind, *kept("midtrain")),
               ScoredModel(f"{c.posttrain.method.upper()} from {c.posttrain.init}", "posttrain", post_kind,
                           *kept("posttrain"))]
    curves = {s: read_training_log(ctx.input(s)) for s in ("teacher", "midtrain", "posttrain")}
    seconds = {s: (read_manifest(ctx.input(s)) or {}).get("seconds") for s in ("teacher", "rollouts", "midtrain",
                                                                                "posttrain")}
    return results_table(ctx.path, scorers, teacher, solver, baseline, trained, curves,
                         {"preset": c.preset, "device": str(runtime.device)}, seconds)


# ---------------------------------------------------------------------------------------------- the graph

TEACHER = ("teacher.source", "teacher.path", "teacher.target")  # which teacher the ODE uses
# the teacher is a denoiser: the consistency models' boundary setting is not its concern
DENOISER_NETWORK = tuple(f"network.{f}" for f in NetworkConfig.model_fields if f != "consistency_boundary")
SCORING = ("eval.num_samples", "eval.seed", "eval.mid_sigma", "eval.mid_sigma_search", "eval.inception_path",
           "eval.fid_mode")
SIGMAS = ("rollout.solver.sigma_min", "rollout.solver.sigma_max")
# the teacher trains without evaluations: the fields that only steer them are not its concern
EVALUATION_ONLY = ("eval_every", "keep", "keep_tolerance")
TEACHER_TRAINING = tuple(f"teacher.train.{f}" for f in TrainConfig.model_fields if f not in EVALUATION_ONLY)
TRAINING_USES = ("eval.batch_size",)
PRECISION = ("precision",)  # bf16 autocast changes what a training stage computes (ids hold the effective one)

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("teacher", reads=("data", *DENOISER_NETWORK, *TEACHER, "teacher.p_mean", "teacher.p_std", *TEACHER_TRAINING,
                            *PRECISION),
          needs=lambda cfg: (), work=_teacher, trains=True),
    Stage("rollouts", reads=("data", *TEACHER, "rollout.solver", "rollout.num_trajectories", "rollout.batch_size",
                             "rollout.seed", "rollout.store"),
          needs=lambda cfg: ("teacher",), work=_rollouts, uses=("rollout.cluster",)),
    Stage("midtrain", reads=("data", "network", *SIGMAS, "midtrain", *SCORING, *PRECISION),
          needs=lambda cfg: ("teacher", "rollouts"), work=_midtrain, uses=TRAINING_USES, trains=True),
    Stage("posttrain", reads=("data", "network", *TEACHER, *SIGMAS, "posttrain", *SCORING, *PRECISION),
          needs=lambda cfg: ("teacher", "midtrain") if cfg.posttrain.init == "cmt" else ("teacher",),
          work=_posttrain, uses=TRAINING_USES, trains=True),
    Stage("evaluation", reads=("data", "network", *TEACHER, "teacher.sampler", *SIGMAS, "midtrain.form",
                               "posttrain.method", "posttrain.init", "eval"),
          needs=lambda cfg: ("teacher", "rollouts", "midtrain", "posttrain"), work=_evaluation,
          uses=("preset",)),
)}
TRAINING_STAGES = tuple(name for name, s in STAGES.items() if s.trains)


def _value(dumped: dict, path: str):
    for key in path.split("."):
        dumped = dumped[key]
    return dumped


def stage_config(cfg: PipelineConfig, stage: str) -> dict:
    """The values of the fields ``stage`` reads, by dotted path (what its id hashes besides its inputs);
    ``precision`` as the run will train in it ('auto' resolved on this machine, ``effective_precision``), and
    left out of a teacher read from outside (``LOADED_TEACHERS``: its file is the same in any precision)."""
    dumped = cfg.model_dump(mode="json")
    dumped["precision"] = effective_precision(cfg.device, cfg.precision)
    values = {path: _value(dumped, path) for path in STAGES[stage].reads}
    if stage == "teacher" and cfg.teacher.source in LOADED_TEACHERS:
        del values["precision"]
    return values


@dataclass(frozen=True)
class Plan:
    ids: dict[str, str]  # stage -> artifact id
    inputs: dict[str, dict[str, str]]  # stage -> {needed stage: its artifact id}


def plan(cfg: PipelineConfig) -> Plan:
    """Every stage's artifact id and input ids, resolved in dependency order (``STAGES`` is ordered)."""
    ids, inputs = {}, {}
    for name, stage in STAGES.items():
        inputs[name] = {n: ids[n] for n in stage.needs(cfg)}
        ids[name] = artifact_id(name, stage_config(cfg, name), inputs[name])
    return Plan(ids, inputs)


def stage_path(cfg: PipelineConfig, stage: str) -> Path:
    """The local folder of ``stage``'s artifact (under an object-storage root: its mirror)."""
    return artifact_dir(cfg.local_root, stage, plan(cfg).ids[stage])


def stage_location(cfg: PipelineConfig, stage: str) -> Path | str:
    """Where ``stage``'s artifact is published: its folder, or its URL under an object-storage root."""
    return remote.join(cfg.artifact_root, stage, plan(cfg).ids[stage])


def stages_needed(cfg: PipelineConfig, targets) -> list[str]:
    """``targets`` and every stage they need, transitively, in pipeline order."""
    needed, todo = set(), list(targets)
    while todo:
        stage = todo.pop()
        if stage not in needed:
            needed.add(stage)
            todo.extend(STAGES[stage].needs(cfg))
    return [s for s in STAGES if s in needed]


# file fields -> the kind of path each must be ("file", "dir", or per data.name)
FILE_FIELDS = {"data.path": None, "teacher.path": "file", "midtrain.lpips_backbone": "file",
               "eval.inception_path": "file"}
DATA_PATH_KIND = {"npz": "file", "image_folder": "dir", "cifar10": "dir"}
LOADED_TEACHERS = ("checkpoint", "edm_pickle", "torchscript", "callable")  # read or run from outside


def _declares(stage: str, path: str) -> bool:
    return any(path == r or path.startswith(r + ".") for r in STAGES[stage].reads + STAGES[stage].uses)


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
        raise PreflightError(f"artifact_root={url!r} cannot be reached: {type(err).__name__}: {_first_line(err)} "
                             f"({hint})") from err
    if not found:
        raise PreflightError(f"artifact_root={url!r} cannot be reached: its bucket does not exist or these "
                             f"credentials cannot read it ({hint})")


def _check_root(cfg: PipelineConfig) -> None:
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
        net = edm_teacher(t, data.sample_shape).model if t.source == "edm_pickle" else load_teacher(t)
        with torch.no_grad():
            out = net(x, torch.ones(2))
    except Exception as err:  # any failure to load or run it is bad input, reported on one line
        raise PreflightError(f"{field}={value!r} cannot be used as the teacher (teacher.source={t.source!r}): "
                             f"{type(err).__name__}: {_first_line(err)}") from err
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(x.shape) or not torch.isfinite(out).all():
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise PreflightError(f"{field}={value!r} is not a denoiser D(x, sigma) of this data: for x of shape "
                             f"{tuple(x.shape)} it answered {got}" + ("" if not isinstance(out, torch.Tensor) or
                                                                      torch.isfinite(out).all() else " (non-finite)"))


def preflight(cfg: PipelineConfig, stages) -> None:
    """Check, before anything runs or is written, everything the stages to compute need from outside the
    config: the artifact root is a writable folder, the device exists, every file or folder a field names
    exists and has the right kind, the data reads, and a teacher read from a file or code loads and answers a
    probe with the right shape. Raises ``PreflightError`` naming the field, the value and what is allowed;
    stages whose artifact is complete need nothing and are skipped."""
    _check_root(cfg)
    todo = [stage for stage in stages if complete_result(cfg, stage) is None]
    if not todo:
        return
    if cfg.device == "cuda" and not uses_cuda("auto"):
        raise PreflightError("device='cuda' but this machine has no usable CUDA device (torch.cuda.is_available() "
                             "is False); set device=auto or device=cpu")
    dumped = cfg.model_dump(mode="json")
    for stage in todo:
        for path, kind in FILE_FIELDS.items():
            value = _value(dumped, path)
            if value is None or not _declares(stage, path):
                continue
            kind = kind or DATA_PATH_KIND.get(cfg.data.name, "file")
            if not Path(value).exists():
                raise PreflightError(f"{path}={value!r} does not exist (the {stage} stage reads it); "
                                     f"put the {kind} there or set {path} to where it is")
            if (kind == "dir") != Path(value).is_dir():
                raise PreflightError(f"{path}={value!r} is a {'folder' if Path(value).is_dir() else 'file'}, "
                                     f"the {stage} stage needs a {'folder' if kind == 'dir' else 'file'} there")
        if stage == "midtrain" and cfg.midtrain.distance == "lpips" and importlib.util.find_spec("lpips") is None:
            raise PreflightError("midtrain.distance='lpips' needs the lpips package: pip install 'cmt[fid]'")
    probe = cfg.teacher.source in LOADED_TEACHERS and any(_declares(s, "teacher.source") for s in todo)
    _check_inputs(cfg.data.model_dump_json(), cfg.teacher.model_dump_json() if probe else None)


@functools.lru_cache(maxsize=16)
def _check_inputs(data_json: str, teacher_json: str | None) -> None:
    """Read the data and probe the teacher (``teacher_json`` None: no probe); each pair is checked once per
    process (``run_pipeline``, the CLI and the flows call ``preflight`` again per stage), a failure every time."""
    data_cfg = DataConfig.model_validate_json(data_json)
    try:
        data = load_data(data_cfg)
    except Exception as err:  # an unreadable data file or folder
        raise PreflightError(f"data.path={str(data_cfg.path)!r} cannot be read as data.name={data_cfg.name!r}: "
                             f"{type(err).__name__}: {_first_line(err)}") from err
    if teacher_json is not None:
        _probe_teacher(TeacherConfig.model_validate_json(teacher_json), data)


def complete_result(cfg: PipelineConfig, stage: str) -> StageResult | None:
    """The complete artifact of ``stage`` (its manifest is written and every file it records is intact), or
    None; an artifact that fails verification is named in a warning and will be recomputed. Under an
    object-storage root the check is made at the URL (sizes from one listing; the sha256 of each file is checked
    when it is fetched) and the files are not fetched (``reuse``)."""
    aid = plan(cfg).ids[stage]
    path, location = artifact_dir(cfg.local_root, stage, aid), remote.join(cfg.artifact_root, stage, aid)
    if cfg.remote_root is None:
        manifest = read_manifest(path)
        problem = manifest and verify_files(path, manifest)
    else:
        manifest = remote.remote_manifest(location)
        problem = manifest and remote.verify_remote(location, manifest)
    if manifest is None:
        return None
    if problem is not None:
        log.warning("%s: the complete artifact %s fails verification (%s); it will be recomputed", stage, location,
                    problem)
        return None
    return StageResult(stage, aid, path, manifest, cached=True, location=location)


def reuse(result: StageResult) -> StageResult:
    """``result`` with its files in its local folder: under an object-storage root they are fetched into the
    mirror (the store stays at the URL); a no-op under a local root."""
    if remote.is_url(result.location):
        remote.fetch_artifact(result.location, result.path)
    return result


def run_stage(cfg: PipelineConfig, stage: str, runtime: Runtime | None = None,
              progress: Progress | None = None) -> StageResult:
    """Return the complete artifact of ``stage``, or compute it (its inputs must be complete).

    The main process holds the artifact's lock while it computes: a second run of the same stage waits, then
    finds the artifact complete and reuses it. A failure while computing raises ``StageError``
    (``InputFileError`` for an input file found unusable) and marks nothing complete."""
    done = complete_result(cfg, stage)
    if done is not None:
        log.info("%s: complete artifact %s, nothing to do", stage, done.location)
        return reuse(done)
    preflight(cfg, [stage])
    runtime = runtime or Runtime.detect(cfg.device, cfg.precision, cfg.cpu_threads)
    resolved = plan(cfg)
    needed = {n: complete_result(cfg, n) for n in resolved.inputs[stage]}
    missing = [n for n, result in needed.items() if result is None]
    if missing:
        raise RuntimeError(f"stage {stage!r} needs the complete artifacts of {missing}; run them first "
                           f"(run_pipeline, or `cmt stage {missing[0]}`)")
    inputs = {n: reuse(result).path for n, result in needed.items()}
    declared = STAGES[stage]
    path, location = stage_path(cfg, stage), stage_location(cfg, stage)
    waiting = f"{stage}: another run is computing {path}; waiting for it, then reusing its result"
    with artifact_lock(path, waiting) if runtime.is_main else contextlib.nullcontext():
        runtime.barrier()
        done = complete_result(cfg, stage)
        if done is not None:
            log.info("%s: computed by another run meanwhile, reusing %s", stage, done.location)
            return reuse(done)
        if runtime.is_main:
            (path / MANIFEST).unlink(missing_ok=True)  # a manifest that failed verification: recompute
            if cfg.remote_root is not None:
                remote.remove_manifest(location)
            path.mkdir(parents=True, exist_ok=True)
            for stale in path.rglob(".*.tmp"):  # left by a killed writer (``publish``); we hold the lock
                stale.unlink()
        runtime.barrier()
        view = ConfigView(cfg, declared.reads + declared.uses, stage)
        locations = {n: result.location for n, result in needed.items()}
        t0 = time.perf_counter()
        try:
            metrics = declared.work(StageContext(stage, view, path, inputs, runtime, location, locations,
                                                 cfg.local_root, progress))
        except (InputFileError, StageError):
            raise
        except Exception as err:
            raise StageError(f"the {stage} stage failed in {path}: {type(err).__name__}: {_first_line(err)}. "
                             f"Nothing was marked complete; remove the cause and rerun: the stage resumes from "
                             f"its last checkpoint") from err
        runtime.barrier()
        if runtime.is_main:
            in_place = remote.store_records(location) if cfg.remote_root is not None else None
            write_manifest(path, stage, resolved.ids[stage], stage_config(cfg, stage), resolved.inputs[stage],
                           metrics, time.perf_counter() - t0, device=str(runtime.device), elsewhere=in_place)
            if cfg.remote_root is not None:
                remote.publish_artifact(path, location)
        runtime.barrier()
    return StageResult(stage, resolved.ids[stage], path, read_manifest(path), cached=False, location=location)


def run_pipeline(cfg: PipelineConfig, runtime: Runtime | None = None, targets=tuple(STAGES)) -> dict[str, StageResult]:
    """``targets`` and the stages they need, in order; complete artifacts are reused. Every file the stages
    to compute read is checked (``preflight``) before the first one starts."""
    needed = stages_needed(cfg, targets)
    preflight(cfg, needed)
    runtime = runtime or Runtime.detect(cfg.device, cfg.precision, cfg.cpu_threads)
    return {stage: run_stage(cfg, stage, runtime) for stage in needed}
