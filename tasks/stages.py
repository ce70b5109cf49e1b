"""One thin Prefect task per stage: teacher, rollouts, mid-training, post-training, evaluation.

Each task takes the validated ``PipelineConfig`` (never tensors: they never hash the same), resolves its
artifact id, returns at once when ``<artifact_root>/<stage>/<id>/`` is complete (the ``cmt_core`` runners
check the manifest first) and otherwise computes the stage, which resumes from its checkpoints. Prefect
caches the returned ``StageResult`` under ``<stage>-<artifact_id>`` (``tasks.caching``).

* Rollouts run on dask inside ``cmt_core``: a LocalCluster for the stage, or the scheduler at
  ``rollout.cluster.address``.
* Mid-training with ``ddp_processes > 1`` runs as a ``torchrun`` subprocess (``tasks.ddp``).

Flows call the tasks through ``run_stage_task``, which turns a Prefect cache hit into a ``StageResult``
read from disk (``cached=True``) and recomputes when the artifact behind a cache entry is gone.
"""

from __future__ import annotations

from prefect import get_run_logger, task

from cmt_core.artifacts import read_manifest
from cmt_core.config import PipelineConfig
from cmt_core.pipeline import STAGE_RUNNERS, StageResult, stage_ids, stage_path
from cmt_core.runtime import Runtime
from tasks.caching import artifact_cache_key, results_path
from tasks.ddp import run_midtrain_ddp
from tasks.reporting import StageProgress, brief, library_logs_to


def _run_name(stage: str):
    def name(parameters: dict) -> str:
        return f"{stage}-{stage_ids(parameters['cfg'])[stage]}"

    return name


def _stage_task(stage: str, name: str):
    return task(name=name, task_run_name=_run_name(stage), cache_key_fn=artifact_cache_key(stage),
                persist_result=True)


def execute_stage(stage: str, cfg: PipelineConfig, ddp_processes: int = 1) -> StageResult:
    """The body of every stage task: reuse the complete artifact or compute it, reporting to the run."""
    logger = get_run_logger()
    aid, path = stage_ids(cfg)[stage], stage_path(cfg, stage)
    with library_logs_to(logger):
        runtime = Runtime.detect(cfg.device, cfg.precision, cfg.cpu_threads)
        if read_manifest(path) is not None:
            logger.info("%s: complete artifact on disk, reusing %s", stage, path)
            return STAGE_RUNNERS[stage](cfg, runtime)
        checkpoint = path / "train" / "checkpoint.pt"
        if checkpoint.exists():
            logger.info("%s: resuming from the checkpoint in %s", stage, checkpoint.parent)
        logger.info("%s: computing artifact %s in %s", stage, aid, path)
        progress = StageProgress(stage, aid, logger)
        if stage == "midtrain" and ddp_processes > 1:
            result = run_midtrain_ddp(cfg, ddp_processes, logger, progress)
        else:
            result = STAGE_RUNNERS[stage](cfg, runtime, progress=progress)
        progress.done()
        logger.info("%s: done in %.1fs %s", stage, result.manifest.get("seconds", 0.0), brief(result.metrics))
        return result


@_stage_task("teacher", "pretrain-teacher")
def pretrain_teacher(cfg: PipelineConfig) -> StageResult:
    """The teacher denoiser: EDM pre-training, or a loaded / exact teacher."""
    return execute_stage("teacher", cfg)


@_stage_task("rollouts", "rollouts")
def rollouts(cfg: PipelineConfig) -> StageResult:
    """Teacher ODE trajectories, solved on a dask cluster."""
    return execute_stage("rollouts", cfg)


@_stage_task("midtrain", "midtrain")
def midtrain(cfg: PipelineConfig, ddp_processes: int = 1) -> StageResult:
    """Consistency mid-training on the rollouts; ``ddp_processes > 1`` runs it under torchrun."""
    return execute_stage("midtrain", cfg, ddp_processes)


@_stage_task("posttrain", "posttrain")
def posttrain(cfg: PipelineConfig) -> StageResult:
    """Post-training (ECT / ECD / Mean Flow) from the chosen initialisation."""
    return execute_stage("posttrain", cfg)


@_stage_task("evaluation", "evaluation")
def evaluation(cfg: PipelineConfig) -> StageResult:
    """The results table, sample grids and curves of the run (report.md, metrics.json, PNGs)."""
    return execute_stage("evaluation", cfg)


STAGE_TASKS = {"teacher": pretrain_teacher, "rollouts": rollouts, "midtrain": midtrain,
               "posttrain": posttrain, "evaluation": evaluation}


def run_stage_task(stage: str, cfg: PipelineConfig, ddp_processes: int = 1) -> StageResult:
    """Call ``stage``'s task inside a flow; a failed task raises here.

    A Prefect cache hit is answered from disk (``cached=True``): when the artifact it points at is gone
    (deleted, or another artifact root with shared results), the task runs again with a refreshed cache.
    """
    stage_task = STAGE_TASKS[stage].with_options(result_storage=results_path(cfg))
    kwargs = {"cfg": cfg, **({"ddp_processes": ddp_processes} if stage == "midtrain" else {})}
    state = stage_task(**kwargs, return_state=True)
    if state.name != "Cached":
        return state.result()
    path = stage_path(cfg, stage)
    manifest = read_manifest(path)
    if manifest is None:
        get_run_logger().warning("%s: Prefect cache entry without a complete artifact at %s; recomputing",
                                 stage, path)
        return stage_task.with_options(refresh_cache=True)(**kwargs)
    return StageResult(stage, stage_ids(cfg)[stage], path, manifest, cached=True)
