"""Prefect's cache for stage tasks: keyed on the artifact id, results persisted beside the artifacts.

The cache key of a stage task is ``<stage>-<artifact_id>`` (``cmt_core.pipeline.stage_ids``), so the same
stage config and inputs hit the cache from any flow run, and orchestration-only parameters (DDP ranks, the
dask scheduler, the artifact root) never miss it. Prefect 3 caches only persisted results; they are written
to ``<artifact_root>/prefect-results`` (or ``$CMT_PREFECT_RESULTS``), shared storage when workers share
the artifact root. The cache is a fast path only: the disk stays the source of truth
(``tasks.stages.run_stage_task`` re-checks the manifest on every hit).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from cmt_core.config import PipelineConfig
from cmt_core.pipeline import stage_ids

RESULTS_ENV = "CMT_PREFECT_RESULTS"
RESULTS_DIR = "prefect-results"


def artifact_cache_key(stage: str) -> Callable[[Any, dict], str]:
    """A ``cache_key_fn`` for ``stage``'s task: its artifact id, from the task's ``cfg`` parameter."""
    def key(_context, parameters: dict) -> str:
        return f"{stage}-{stage_ids(parameters['cfg'])[stage]}"

    return key


def results_path(cfg: PipelineConfig) -> Path:
    """Where stage tasks persist their results (Prefect's cache records)."""
    configured = os.environ.get(RESULTS_ENV)
    return (Path(configured) if configured else Path(cfg.artifact_root) / RESULTS_DIR).absolute()
