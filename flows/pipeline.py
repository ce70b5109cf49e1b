"""The end-to-end flow ``cmt-pipeline`` and the stage wiring every flow shares (``run_stages``).

A stage runs after the stages it reads (``cmt_core.pipeline.stage_inputs``); complete stages are reused
from Prefect's cache or from disk, so a rerun starts at the first incomplete stage, and a changed stage
config re-executes that stage and the ones that read it, nothing before it.
"""

from __future__ import annotations

import tasks  # noqa: F401  (sets Prefect's environment defaults before prefect is imported)

import yaml
from prefect import flow, get_run_logger

from cmt_core.artifacts import STAGES
from cmt_core.config import PipelineConfig
from cmt_core.pipeline import StageResult, stage_ids, stage_inputs
from flows.parameters import DdpProcesses, PresetName, resolve_config
from tasks.reporting import TRAINING_STAGES, publish_evaluation, publish_stage_summary, publish_training_report
from tasks.stages import run_stage_task


def stages_needed(cfg: PipelineConfig, targets: list[str]) -> list[str]:
    """``targets`` and every stage they read, transitively, in pipeline order."""
    inputs, needed, todo = stage_inputs(cfg), set(), list(targets)
    while todo:
        stage = todo.pop()
        if stage not in needed:
            needed.add(stage)
            todo.extend(inputs[stage])
    return [s for s in STAGES if s in needed]


def run_stages(cfg: PipelineConfig, targets: list[str], ddp_processes: int = 1) -> dict[str, StageResult]:
    """Run ``targets`` and what they need, one task per stage, and publish the run's result artifacts."""
    logger = get_run_logger()
    logger.info("config (%s):\n%s", cfg.preset, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    ids = stage_ids(cfg)
    results: dict[str, StageResult] = {}
    try:
        for stage in stages_needed(cfg, targets):
            logger.info("%s: artifact %s", stage, ids[stage])
            results[stage] = run_stage_task(stage, cfg, ddp_processes)
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


@flow(name="cmt-pipeline")
def cmt_pipeline(preset: PresetName = "digits", overrides: tuple[str, ...] = (),
                 config: PipelineConfig | None = None, artifact_root: str | None = None,
                 ddp_processes: DdpProcesses = 1) -> dict[str, StageResult]:
    """Teacher -> rollouts -> mid-training (CMT) -> post-training -> evaluation; complete stages are reused.

    Args:
        preset: Named configuration (toy: 2-D mixture; digits: 8x8 digits, the default; cifar10: the
            paper's recipe; cifar10-tiny: the same at toy size).
        overrides: Dotted `key=value` settings applied on top, as `cmt run --set`,
            e.g. `midtrain.train.lr=1e-4` or `rollout.cluster.address=tcp://host:8786`.
        config: A whole pipeline configuration used instead of the preset (the overrides still apply).
        artifact_root: Folder of the stage artifacts (default: the config's, `artifacts`); shared
            storage when workers run on several machines.
        ddp_processes: Mid-training processes; more than 1 runs it under torchrun (DDP).
    """
    return run_stages(resolve_config(preset, overrides, config, artifact_root), list(STAGES), ddp_processes)
