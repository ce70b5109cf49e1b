"""One thin Prefect task per pipeline stage, made from the stage declarations of ``cmt_core.stages``.

Each task takes the validated ``PipelineConfig`` (never tensors: they never hash the same) and calls
``cmt_core.stages.run_stage``, which returns at once when the artifact is complete on disk and otherwise
computes it (training stages resume from their checkpoints). Prefect caches the returned ``StageResult``
under ``<stage>-<artifact_id>`` (``tasks.caching``); a cache hit is answered from disk (marked ``cached``),
and one whose artifact is gone (deleted, or another artifact root sharing the results) runs the task again.

* Rollouts run on dask inside ``cmt_core``: a LocalCluster for the stage, or the scheduler at
  ``rollout.cluster.address``.
* A training stage whose ``launch`` section asks for more than one process runs as a ``torchrun`` subprocess
  (``tasks.ddp``).
"""

from __future__ import annotations

from prefect import get_run_logger, task

from cmt_core.config import PipelineConfig
from cmt_core.runtime import Runtime
from cmt_core.stages import STAGES, TRAINING_STAGES, StageResult, complete_result, plan, reuse, run_stage
from tasks.caching import artifact_cache_key, results_path
from tasks.ddp import run_stage_ddp
from tasks.reporting import StageProgress, brief, library_logs_to


def execute_stage(stage: str, cfg: PipelineConfig) -> StageResult:
    """The body of every stage task: reuse the complete artifact or compute it, reporting to the run."""
    logger = get_run_logger()
    aid = plan(cfg).ids[stage]
    with library_logs_to(logger):
        progress = StageProgress(stage, aid, logger)
        if stage in TRAINING_STAGES and cfg.launch.nodes * cfg.launch.procs_per_node > 1:
            result = run_stage_ddp(cfg, stage, logger, progress)
        else:
            result = run_stage(cfg, stage, Runtime.detect(cfg.device, cfg.precision, cfg.cpu_threads), progress)
        if not result.cached:
            progress.done()
        verb = "reused" if result.cached else f"done in {result.manifest.get('seconds', 0.0):.1f}s"
        logger.info("%s: %s %s %s", stage, verb, result.location, brief(result.metrics))
        return result


def _stage_task(stage: str):
    def body(cfg: PipelineConfig) -> StageResult:
        return execute_stage(stage, cfg)

    body.__doc__ = (STAGES[stage].work.__doc__ or "").split("\n")[0]
    return task(name=stage, task_run_name=lambda parameters: f"{stage}-{plan(parameters['cfg']).ids[stage]}",
                cache_key_fn=artifact_cache_key(stage), persist_result=True)(body)


STAGE_TASKS = {stage: _stage_task(stage) for stage in STAGES}


def run_stage_task(stage: str, cfg: PipelineConfig) -> StageResult:
    """Call ``stage``'s task inside a flow (a failed task raises here); a cache hit is answered from disk."""
    stage_task = STAGE_TASKS[stage].with_options(result_storage=results_path(cfg))
    state = stage_task(cfg=cfg, return_state=True)
    if state.name != "Cached":
        return state.result()
    done = complete_result(cfg, stage)
    if done is None:
        get_run_logger().warning("%s: Prefect cache entry without a complete artifact; recomputing", stage)
        return stage_task.with_options(refresh_cache=True)(cfg=cfg)
    return reuse(done)
