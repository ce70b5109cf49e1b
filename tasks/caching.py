"""Prefect's cache for stage tasks: keyed on the artifact id, results persisted beside the artifacts.

The cache key of a stage task is ``<stage>-<artifact_id>`` (from the run's ``Plan``), so the same stage config
and inputs hit the cache from any flow run, and orchestration-only parameters (DDP ranks, the dask
scheduler, the artifact root) never miss it. Prefect 3 caches only persisted results; they are written to
``<artifact_root>/prefect-results`` (under an object-storage root: its local mirror's; or ``$CMT_PREFECT_RESULTS``).
The cache is a fast path only: a hit is checked against the artifact by the same
``cmt_core.engine.complete_result`` that ``compute_stage`` uses (``tasks.stages.run_stage_task``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cmt_core.artifacts import RESULTS_DIR
from cmt_core.config import PipelineConfig

RESULTS_ENV = "CMT_PREFECT_RESULTS"


def artifact_cache_key(stage: str) -> Callable[[Any, dict], str]:
    """A ``cache_key_fn`` for ``stage``'s task: ``<stage>-<artifact id>`` from the task's ``plan`` parameter."""
    def key(_context, parameters: dict) -> str:
        return f"{stage}-{parameters['plan'].ids[stage]}"

    return key


def results_path(cfg: PipelineConfig) -> Path:
    """Where stage tasks persist their results (Prefect's cache records)."""
    configured = os.environ.get(RESULTS_ENV)
    return (Path(configured) if configured else cfg.local_root / RESULTS_DIR).absolute()
