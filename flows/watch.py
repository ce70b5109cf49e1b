"""The flow ``cmt-watch``: the progress of a run's training stages, scored from their latest checkpoints.

Started on a schedule (the ``cmt-watch/digits`` deployment has a nightly one, off until switched on), it reads the
artifact folders of the run its parameters describe (the same parameters as ``cmt-pipeline``) and, for each
training stage, scores the kept model of a finished stage or the EMA of the latest checkpoint of one still running
(``cmt_core.watch``). It starts no stage and writes nothing into the artifacts; the metrics are posted as a table
artifact whose key is the same at every run, so the artifact's page in the UI lists one version per night.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task

import tasks  # noqa: F401  (Prefect environment defaults before prefect is imported)
from cmt_core.config import PipelineConfig
from cmt_core.runtime import Runtime
from cmt_core.stages import plan
from cmt_core.watch import watch
from flows.parameters import PresetName, flow_config
from tasks.reporting import artifact_key, library_logs_to


@task(name="watch")
def watch_task(cfg: PipelineConfig) -> list[dict]:
    """Score every training stage's latest model (``cmt_core.watch.watch``)."""
    with library_logs_to(get_run_logger()):
        return watch(plan(cfg), Runtime.detect(cfg.device, cfg.precision, cfg.cpu_threads))


@flow(name="cmt-watch")
def cmt_watch(preset: PresetName = "digits", overrides: tuple[str, ...] = (), config: PipelineConfig | None = None,
              artifact_root: str | None = None) -> list[dict]:
    """Score the latest checkpoint of every training stage of a run (the kept model of a finished one) without
    starting anything, and post the metrics as a table artifact.

    Args:
        preset: The run's named configuration, as in cmt-pipeline.
        overrides: Its dotted `key=value` settings, as in cmt-pipeline (they decide the artifact ids read).
        config: Its whole pipeline configuration, used instead of the preset (the overrides still apply).
        artifact_root: The run's artifact folder or object-storage URL (default: the config's).
    """
    from prefect.artifacts import create_table_artifact

    cfg = flow_config(preset, overrides, config, artifact_root)
    rows = watch_task(cfg)
    columns = list(dict.fromkeys(k for row in rows for k in row))  # the UI takes its columns from row 0
    create_table_artifact([{c: row.get(c) for c in columns} for row in rows],
                          key=artifact_key("cmt", cfg.preset, "progress"),
                          description=f"Training progress ({cfg.preset}): the latest checkpoint of each stage")
    for row in rows:
        get_run_logger().info("%s: %s at step %s/%s %s", row["stage"], row["state"], row["step"], row["steps"],
                              {k: v for k, v in row.items() if k.endswith(("_1step", "_2step", "_teacher"))})
    return rows
