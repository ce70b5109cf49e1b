"""Prefect's cache for stage tasks: keyed on the artifact id, results persisted beside the artifacts.

The cache key of a stage task is ``<stage>-<artifact_id>`` (``cmt_core.stages.plan``), so the same stage config
and inputs hit the cache from any flow run, and orchestration-only parameters (DDP ranks, the dask
scheduler, the artifact root) never miss it. The key exists only while the artifact is complete on disk
(``cmt_core.stages.complete_result``): a deleted artifact, or another artifact root sharing the results,
runs the task instead of returning a stale result. Prefect 3 caches only persisted results; they are
written to ``<artifact_root>/prefect-results`` (or ``$CMT_PREFECT_RESULTS``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from cmt_core.config import PipelineConfig
from cmt_core.stages import complete_result

RESULTS_ENV = "CMT_PREFECT_RESULTS"
RESULTS_DIR = "prefect-results"


def artifact_cache_key(stage: str) -> Callable[[Any, dict], str | None]:
    """A ``cache_key_fn`` for ``stage``'s task: its artifact id while the artifact is complete, else None."""
    def key(_context, parameters: dict) -> str | None:
        done = complete_result(parameters["cfg"], stage)
        return None if done is None else f"{stage}-{done.artifact_id}"

    return key


def results_path(cfg: PipelineConfig) -> Path:
    """Where stage tasks persist their results (Prefect's cache records)."""
    configured = os.environ.get(RESULTS_ENV)
    return (Path(configured) if configured else Path(cfg.artifact_root) / RESULTS_DIR).absolute()
