"""The end-to-end flow ``cmt-pipeline``, and ``stage_flow``, which makes every flow of this package.

A flow resolves the run's plan once (``cmt_core.stages.plan``), checks the inputs of every stage it will compute
(``cmt_core.preflight``), then runs its target stages and what they need, one task per stage; complete stages are
reused from Prefect's cache or from disk, so a rerun starts at the first incomplete stage, and a changed stage
config re-executes that stage and the ones that read it, nothing before it.
"""

from __future__ import annotations

import yaml
from prefect import flow, get_run_logger

import tasks  # noqa: F401  (sets Prefect's environment defaults before prefect is imported)
from cmt_core.config import PipelineConfig
from cmt_core.engine import StageResult
from cmt_core.preflight import preflight
from cmt_core.stages import PIPELINE, TRAINING_STAGES, plan
from flows.parameters import ARGS_DOC, DdpProcesses, PresetName, flow_config
from tasks.reporting import publish_evaluation, publish_stage_summary, publish_training_report
from tasks.stages import run_stage_task


def run_stages(cfg: PipelineConfig, targets: list[str]) -> dict[str, StageResult]:
    """Run ``targets`` and what they need, one task per stage, and publish the run's result artifacts."""
    logger = get_run_logger()
    logger.info("config (%s):\n%s", cfg.preset, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    resolved = plan(cfg)
    needed = resolved.needed(targets)
    preflight(resolved, needed)  # a missing file fails the run before any stage starts
    results: dict[str, StageResult] = {}
    try:
        for stage in needed:
            logger.info("%s: artifact %s", stage, resolved.ids[stage])
            results[stage] = run_stage_task(stage, resolved)
            if not results[stage].cached and stage in TRAINING_STAGES:
                publish_training_report(results[stage])
    finally:
        if results:
            publish_stage_summary(results, cfg.preset)
    if "evaluation" in results:
        publish_evaluation(results["evaluation"], cfg.preset)
    computed = [s for s, r in results.items() if not r.cached]
    logger.info("computed: %s; reused: %s", ", ".join(computed) or "none",
                ", ".join(s for s in results if s not in computed) or "none")
    return results


def stage_flow(name: str, targets: list[str], summary: str, example: str):
    """A flow named ``name`` that runs ``targets`` (and what they need) with the shared parameters."""
    def run(preset: PresetName = "digits", overrides: tuple[str, ...] = (), config: PipelineConfig | None = None,
            artifact_root: str | None = None, ddp_processes: DdpProcesses = 1) -> dict[str, StageResult]:
        return run_stages(flow_config(preset, overrides, config, artifact_root, ddp_processes), targets)

    run.__name__ = run.__qualname__ = name.replace("-", "_")
    run.__doc__ = summary + "\n" + ARGS_DOC.format(example=example)
    return flow(name=name)(run)


cmt_pipeline = stage_flow("cmt-pipeline", list(PIPELINE),
                          "Teacher -> rollouts -> mid-training (CMT) -> post-training -> evaluation; "
                          "complete stages are reused.", "midtrain.train.lr=1e-4")
