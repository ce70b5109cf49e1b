"""The pipeline as plain library calls: teacher -> rollouts -> mid-training -> post-training -> evaluation.

Each ``run_<stage>(cfg, runtime)`` resolves its artifact id from its config and its inputs' ids
(``stage_ids``), returns at once when ``<artifact_root>/<stage>/<id>/manifest.json`` exists, and otherwise
computes the stage inside that folder (training stages resume from their checkpoints) and writes the
manifest last. ``run_pipeline(cfg)`` runs them in order; orchestrators call the stages one by one.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from cmt_core.artifacts import artifact_dir, artifact_id, read_manifest, write_manifest
from cmt_core.config import PipelineConfig
from cmt_core.data import Data, load_data
from cmt_core.models import build_model, init_from, load_model, save_model
from cmt_core.objectives.cmt import CMTLoss
from cmt_core.objectives.ect import ECTLoss
from cmt_core.objectives.edm import EDMLoss
from cmt_core.objectives.meanflow import MeanFlowLoss
from cmt_core.runtime import Runtime
from cmt_core.store_loader import StorePairs
from cmt_core.teachers import load_teacher, new_teacher
from cmt_core.training import train

log = logging.getLogger("cmt")
MODEL_FILE = "model.pt"
STORE_DIR = "store.zarr"


@dataclass
class StageResult:
    stage: str
    artifact_id: str
    path: Path
    manifest: dict
    cached: bool

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})


def midtrain_kind(cfg: PipelineConfig) -> str:
    return "consistency" if cfg.midtrain.form == "cm" else "flow_map"


def posttrain_kind(cfg: PipelineConfig) -> str:
    return "flow_map" if cfg.posttrain.method == "meanflow" else "consistency"


def stage_configs(cfg: PipelineConfig) -> dict[str, dict]:
    """The part of the config each stage's output depends on (orchestration fields excluded)."""
    d = cfg.model_dump(mode="json")
    rollout = {k: v for k, v in d["rollout"].items() if k != "cluster"}
    # training stages keep their best checkpoint by the metric: they depend on how it is measured
    scoring = {k: v for k, v in d["eval"].items() if k not in ("num_seed_sets", "batch_size")}
    return {
        "teacher": {"data": d["data"], "network": d["network"], "teacher": d["teacher"]},
        "rollouts": {"rollout": rollout, "data": d["data"]},
        "midtrain": {"midtrain": d["midtrain"], "network": d["network"], "eval": scoring},
        "posttrain": {"posttrain": d["posttrain"], "network": d["network"], "eval": scoring,
                      "sigma_max": cfg.rollout.solver.sigma_max},
        "evaluation": {"eval": d["eval"], "teacher_sampler": d["teacher"]["sampler"],
                       "sigma_max": cfg.rollout.solver.sigma_max},
    }


def stage_inputs(cfg: PipelineConfig) -> dict[str, dict[str, str]]:
    """Input artifact ids of every stage, resolved in order."""
    parts, ids, inputs = stage_configs(cfg), {}, {}
    deps = {"teacher": [], "rollouts": ["teacher"], "midtrain": ["teacher", "rollouts"],
            "posttrain": ["teacher"] + (["midtrain"] if cfg.posttrain.init == "cmt" else []),
            "evaluation": ["teacher", "midtrain", "posttrain"]}
    for stage, needs in deps.items():
        inputs[stage] = {n: ids[n] for n in needs}
        ids[stage] = artifact_id(stage, parts[stage], inputs[stage])
    return {"ids": ids, **inputs}


def stage_ids(cfg: PipelineConfig) -> dict[str, str]:
    return stage_inputs(cfg)["ids"]


def stage_path(cfg: PipelineConfig, stage: str) -> Path:
    return artifact_dir(cfg.artifact_root, stage, stage_ids(cfg)[stage])


def run_stage(cfg: PipelineConfig, stage: str, runtime: Runtime, work: Callable[[Path], dict]) -> StageResult:
    """Return the complete artifact of ``stage`` or compute it with ``work(path) -> metrics``."""
    resolved = stage_inputs(cfg)
    aid, inputs = resolved["ids"][stage], resolved[stage]
    path = artifact_dir(cfg.artifact_root, stage, aid)
    manifest = read_manifest(path)
    if manifest is not None:
        log.info("%s: complete artifact %s, nothing to do", stage, path)
        return StageResult(stage, aid, path, manifest, cached=True)
    path.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    metrics = work(path)
    runtime.barrier()
    if runtime.is_main:
        manifest = write_manifest(path, stage, aid, stage_configs(cfg)[stage], inputs, metrics,
                                  time.perf_counter() - t0)
    runtime.barrier()
    return StageResult(stage, aid, path, read_manifest(path) or manifest, cached=False)


# ----------------------------------------------------------------------------------------------- stages


def run_teacher(cfg: PipelineConfig, runtime: Runtime, progress=None) -> StageResult:
    """The teacher's network weights (``model.pt``): EDM pre-training or a loaded checkpoint.

    With the exact 2-D teacher, rollouts use the closed-form denoiser and the weights pre-trained here are
    what 'teacher initialisation' starts from. TorchScript / callable teachers have no weights of ours."""
    def work(path: Path) -> dict:
        data = load_data(cfg.data)
        if cfg.teacher.source in ("torchscript", "callable"):
            return {"weights": False}
        if cfg.teacher.source == "checkpoint":
            model = load_teacher(cfg.teacher)
            if runtime.is_main:
                save_model(path / MODEL_FILE, model, "denoiser", cfg.network, data.sample_shape)
            return {"weights": True}
        model = new_teacher(cfg.network, data.sample_shape)
        loss = EDMLoss(cfg.teacher.p_mean, cfg.teacher.p_std, cfg.network.sigma_data)
        result = train(model, loss, data.source(cfg.teacher.train.seed), cfg.teacher.train, path / "train",
                       runtime, desc="teacher", progress=progress)
        if runtime.is_main:
            save_model(path / MODEL_FILE, result.model, "denoiser", cfg.network, data.sample_shape)
        return {"weights": True, "final_loss": result.history[-1]["loss"] if result.history else None}

    return run_stage(cfg, "teacher", runtime, work)


def teacher_denoiser(cfg: PipelineConfig, data: Data, device: torch.device) -> torch.nn.Module:
    """The denoiser that solves the ODE: the exact one, a loaded one, or the pre-trained weights."""
    if cfg.teacher.source == "pretrain":
        return load_model(stage_path(cfg, "teacher") / MODEL_FILE).to(device)
    return load_teacher(cfg.teacher, data.distribution).to(device)


def teacher_weights(cfg: PipelineConfig) -> torch.nn.Module:
    path = stage_path(cfg, "teacher") / MODEL_FILE
    if not path.exists():
        raise ValueError(f"teacher.source={cfg.teacher.source!r} has no network weights to initialise from; "
                         "use init='random' or a checkpoint teacher")
    return load_model(path)


def rollout_teacher(config_json: str) -> torch.nn.Module:
    """Builds the rollout teacher inside a dask worker (a picklable ``denoiser_factory``)."""
    cfg = PipelineConfig.model_validate_json(config_json)
    return teacher_denoiser(cfg, load_data(cfg.data), torch.device("cpu"))


def run_rollouts(cfg: PipelineConfig, runtime: Runtime, progress=None) -> StageResult:
    """Teacher ODE trajectories in a zarr store (``store.zarr``), solved shard by shard on dask."""
    from cmt_core.distributed_rollouts import run_rollouts as solve_on_dask

    def work(path: Path) -> dict:
        if runtime.is_main:
            data = load_data(cfg.data)
            factory = functools.partial(rollout_teacher, cfg.model_dump_json())
            solve_on_dask(factory, path / STORE_DIR, cfg.rollout.num_trajectories, data.sample_shape, cfg.rollout,
                          teacher_id=stage_ids(cfg)["teacher"])
        return {"num_trajectories": cfg.rollout.num_trajectories, "time_points": cfg.rollout.solver.steps + 1,
                "store": STORE_DIR}

    return run_stage(cfg, "rollouts", runtime, work)


def _scorer(cfg: PipelineConfig, data: Data, runtime: Runtime, num_samples: int | None = None):
    from cmt_core.evaluation.evaluator import Evaluator
    from cmt_core.scoring import Scorer

    evaluator = Evaluator(data, cfg.eval, Path(cfg.artifact_root) / "features")
    return Scorer(data, cfg, evaluator, runtime.device, num_samples)


def run_midtrain(cfg: PipelineConfig, runtime: Runtime, progress=None) -> StageResult:
    """Consistency mid-training on the rollouts; keeps the best 1-step EMA model (``model.pt``)."""
    def work(path: Path) -> dict:
        data = load_data(cfg.data)
        kind = midtrain_kind(cfg)
        torch.manual_seed(cfg.midtrain.train.seed)
        model = build_model(kind, cfg.network, data.sample_shape, cfg.rollout.solver.sigma_min)
        if cfg.midtrain.init == "teacher":
            init_from(model, teacher_weights(cfg))
        source = StorePairs(stage_path(cfg, "rollouts") / STORE_DIR, to_end=cfg.midtrain.form == "cm",
                            seed=cfg.midtrain.train.seed)
        loss = CMTLoss(cfg.midtrain.form, cfg.midtrain.distance, cfg.midtrain.huber_c)
        scorer = _scorer(cfg, data, runtime)
        result = train(model, loss, source, cfg.midtrain.train, path / "train", runtime,
                       evaluate=scorer.training_evaluate(kind) if cfg.midtrain.train.eval_every else None,
                       desc="mid-training", progress=progress)
        if runtime.is_main:
            save_model(path / MODEL_FILE, result.model, kind, cfg.network, data.sample_shape)
        return {"best_step": result.best_step, "best_score": result.best_score, "score_name": scorer.primary}

    return run_stage(cfg, "midtrain", runtime, work)


def posttrain_init(cfg: PipelineConfig, sample_shape) -> torch.nn.Module:
    kind = posttrain_kind(cfg)
    torch.manual_seed(cfg.posttrain.train.seed)
    if cfg.posttrain.init == "cmt":
        return load_model(stage_path(cfg, "midtrain") / MODEL_FILE).train()
    model = build_model(kind, cfg.network, sample_shape, cfg.rollout.solver.sigma_min)
    return init_from(model, teacher_weights(cfg)) if cfg.posttrain.init == "teacher" else model


def run_posttrain(cfg: PipelineConfig, runtime: Runtime, progress=None) -> StageResult:
    """ECT / ECD / Mean Flow from the chosen initialisation; keeps the best 1-step EMA model."""
    def work(path: Path) -> dict:
        data = load_data(cfg.data)
        kind, p = posttrain_kind(cfg), cfg.posttrain
        model = posttrain_init(cfg, data.sample_shape)
        smin, smax = cfg.rollout.solver.sigma_min, cfg.rollout.solver.sigma_max
        if p.method == "meanflow":
            loss = MeanFlowLoss(p.meanflow, smin, smax)
        else:
            teacher = teacher_denoiser(cfg, data, runtime.device).eval() if p.method == "ecd" else None
            loss = ECTLoss(p.ect, smin, smax, teacher, p.ecd_solver)
        scorer = _scorer(cfg, data, runtime)
        result = train(model, loss, data.source(p.train.seed), p.train, path / "train", runtime,
                       evaluate=scorer.training_evaluate(kind) if p.train.eval_every else None,
                       desc="post-training", progress=progress)
        if runtime.is_main:
            save_model(path / MODEL_FILE, result.model, kind, cfg.network, data.sample_shape)
        return {"best_step": result.best_step, "best_score": result.best_score, "score_name": scorer.primary}

    return run_stage(cfg, "posttrain", runtime, work)


def run_evaluation(cfg: PipelineConfig, runtime: Runtime, progress=None) -> StageResult:
    """The results table: data floor, teacher at its NFE, CMT and post-trained models at 1 and 2 steps."""
    from cmt_core.evaluation_table import evaluate_pipeline

    def work(path: Path) -> dict:
        return evaluate_pipeline(cfg, path, runtime, _scorer(cfg, load_data(cfg.data), runtime)) if runtime.is_main else {}

    return run_stage(cfg, "evaluation", runtime, work)


STAGE_RUNNERS = {"teacher": run_teacher, "rollouts": run_rollouts, "midtrain": run_midtrain,
                 "posttrain": run_posttrain, "evaluation": run_evaluation}


def run_pipeline(cfg: PipelineConfig, runtime: Runtime | None = None) -> dict[str, StageResult]:
    """All stages in order; complete artifacts are reused."""
    runtime = runtime or Runtime.detect(cfg.device, cfg.precision, cfg.cpu_threads)
    return {stage: runner(cfg, runtime) for stage, runner in STAGE_RUNNERS.items()}
