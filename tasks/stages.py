"""One thin Prefect task per pipeline stage, made from the stage declarations of ``cmt_core.stages``.

Each task takes the run's ``Plan`` (the validated ``PipelineConfig`` resolved once by the flow, whose inputs the
flow has checked; never tensors: they never hash the same) and calls ``cmt_core.engine.compute_stage``, which
returns at once when the artifact is complete on disk and otherwise computes it (training stages resume from their
checkpoints). Prefect caches the returned ``StageResult``
under ``<stage>-<artifact_id>`` (``tasks.caching``); a cache hit is answered from disk (marked ``cached``),
and one whose artifact is gone (deleted, or another artifact root sharing the results) runs the task again.

* Rollouts run on dask inside ``cmt_core``: a LocalCluster for the stage, or the scheduler at
  ``rollout.cluster.address``.
* A training stage whose ``launch`` section asks for more than one process runs as a ``torchrun`` subprocess
  (``tasks.ddp``).
"""

from __future__ import annotations

from prefect import get_run_logger, task

from cmt_core.engine import Plan, StageResult, complete_result, compute_stage, reuse
from cmt_core.runtime import Runtime
from cmt_core.stages import STAGES, TRAINING_STAGES
from tasks.caching import artifact_cache_key, results_path
from tasks.ddp import run_stage_ddp
from tasks.reporting import StageProgress, brief, library_logs_to


def execute_stage(stage: str, plan: Plan) -> StageResult:
    """The body of every stage task: reuse the complete artifact or compute it, reporting to the run."""
    logger, cfg = get_run_logger(), plan.cfg
    with library_logs_to(logger):
        progress = StageProgress(stage, plan.ids[stage], logger)
        if stage in TRAINING_STAGES and cfg.launch.nodes * cfg.launch.procs_per_node > 1:
            result = run_stage_ddp(plan, stage, logger, progress)
        else:
            result = compute_stage(plan, stage, Runtime.detect(cfg.device, cfg.precision, cfg.cpu_threads), progress)
        if not result.cached:
            progress.done()
        verb = "reused" if result.cached else f"done in {result.manifest.get('seconds', 0.0):.1f}s"
        logger.info("%s: %s %s %s", stage, verb, result.location, brief(result.metrics))
        return result


def _stage_task(stage: str):
    def body(plan: Plan) -> StageResult:
        return execute_stage(stage, plan)

    body.__doc__ = (STAGES[stage].work.__doc__ or "").split("\n")[0]
    return task(name=stage, task_run_name=lambda parameters: f"{stage}-{parameters['plan'].ids[stage]}",
                cache_key_fn=artifact_cache_key(stage), persist_result=True)(body)


STAGE_TASKS = {stage: _stage_task(stage) for stage in STAGES}


def run_stage_task(stage: str, plan: Plan) -> StageResult:
    """Call ``stage``'s task inside a flow (a failed task raises here); a cache hit is answered from disk."""
    stage_task = STAGE_TASKS[stage].with_options(result_storage=results_path(plan.cfg))
    state = stage_task(plan=plan, return_state=True)
    if state.name != "Cached":
        result = state.result()
        plan.done[stage] = result
        return result
    done = complete_result(plan, stage)
    if done is None:
        get_run_logger().warning("%s: Prefect cache entry without a complete artifact; recomputing", stage)
        return stage_task.with_options(refresh_cache=True)(plan=plan)
    return reuse(done)
