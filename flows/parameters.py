"""The parameters every flow takes, and how they resolve to one validated ``PipelineConfig``.

In the Prefect UI a run's form shows, in this order:

* ``preset``: a dropdown of the named presets (``cmt_core.presets``);
* ``overrides``: a list of ``key.path=value`` strings applied on top, as ``cmt run --set`` does
  (e.g. ``midtrain.train.lr=1e-4``, ``rollout.cluster.address=tcp://10.0.0.5:8786``);
* ``config``: optional, a whole ``PipelineConfig`` as a nested form (every stage's model, its ranges and
  choices), used instead of the preset; the overrides still apply on top;
* ``artifact_root``: where artifacts live (shared storage when workers are on several machines);
* ``ddp_processes``: mid-training processes (``torchrun`` when > 1).

The API checks every typed value against the schema when a run is created (an unknown preset, a negative
``steps`` inside ``config``, ``ddp_processes=0``, ... are rejected); overrides are validated by the same
pydantic models before any stage starts, and the error names the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from cmt_core.config import PipelineConfig
from cmt_core.presets import PRESETS, apply_overrides, get_preset

PresetName = Literal[tuple(PRESETS)]  # the UI renders a Literal as a dropdown
DdpProcesses = Annotated[int, Field(ge=1, le=1024)]


def resolve_config(preset: str = "digits", overrides: list[str] | None = None,
                   config: PipelineConfig | None = None, artifact_root: str | None = None) -> PipelineConfig:
    """``config`` (or the preset) with the dotted ``overrides`` and ``artifact_root`` applied, validated."""
    overrides = list(overrides or [])
    if config is None:
        cfg = get_preset(preset, overrides)
    else:
        cfg = PipelineConfig.model_validate(apply_overrides(config.model_dump(mode="json"), overrides))
    if artifact_root:
        cfg.artifact_root = Path(artifact_root)
    return cfg
