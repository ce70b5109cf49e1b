"""Running the pipeline from Python: the plan computed once, its inputs checked once, then the stages in order.

    from cmt_core.presets import get_preset
    from cmt_core.pipeline import run_pipeline, run_stage

    cfg = get_preset("toy", ["posttrain.train.steps=500"], artifact_root="artifacts")
    results = run_pipeline(cfg)            # the whole run, complete stages reused
    run_stage(cfg, "midtrain")             # one stage (its inputs must be complete)

Both are entry points: they check their inputs (``cmt_core.preflight``) before anything runs. Orchestrators that
check once for many runs or stages (the command line, the Prefect flows, the comparison) compute on the plan they
checked (``compute_targets``, ``cmt_core.engine.compute_stage``).
"""

from __future__ import annotations

from cmt_core.engine import Plan, Progress, StageResult, compute_stage
from cmt_core.preflight import preflight
from cmt_core.runtime import Runtime
from cmt_core.stages import PIPELINE, plan


def run_stage(cfg, stage: str, runtime: Runtime | None = None, progress: Progress | None = None,
              resolved: Plan | None = None) -> StageResult:
    """The complete artifact of ``stage``, computed if need be (its inputs must be complete); ``resolved``: the
    run's plan when the caller has one."""
    resolved = resolved or plan(cfg)
    preflight(resolved, [stage])
    runtime = runtime or Runtime.detect(cfg.device, cfg.precision, cfg.cpu_threads)
    return compute_stage(resolved, stage, runtime, progress)


def compute_targets(resolved: Plan, targets, runtime: Runtime | None = None) -> dict[str, StageResult]:
    """``targets`` and the stages they need, in order, on a plan whose inputs were checked; complete artifacts are
    reused."""
    cfg = resolved.cfg
    runtime = runtime or Runtime.detect(cfg.device, cfg.precision, cfg.cpu_threads)
    return {stage: compute_stage(resolved, stage, runtime) for stage in resolved.needed(targets)}


def run_pipeline(cfg, runtime: Runtime | None = None, targets=PIPELINE) -> dict[str, StageResult]:
    """``targets`` and the stages they need, in order; complete artifacts are reused. Every file the stages
    to compute read is checked (``preflight``) before the first one starts."""
    resolved = plan(cfg)
    preflight(resolved, resolved.needed(targets))
    return compute_targets(resolved, targets, runtime)
