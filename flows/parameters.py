"""The parameters every flow takes; they resolve to one validated config by ``cmt_core.presets.resolve_config``.

In the Prefect UI a run's form shows, in this order:

* ``preset``: a dropdown of the named presets (``cmt_core.presets``);
* ``overrides``: a list of ``key.path=value`` strings applied on top, as ``cmt run --set`` does
  (e.g. ``midtrain.train.lr=1e-4``, ``rollout.cluster.address=tcp://10.0.0.5:8786``);
* ``config``: optional, a whole ``PipelineConfig`` as a nested form (every stage's model, its ranges and
  choices), used instead of the preset; the overrides still apply on top;
* ``artifact_root``: where artifacts live (shared storage when workers are on several machines);
* ``ddp_processes``: processes of each training stage that computes (``torchrun`` when > 1).

The API checks every typed value against the schema when a run is created (an unknown preset, a negative
``steps`` inside ``config``, ``ddp_processes=0``, ... are rejected); overrides are validated by the same
pydantic models before any stage starts, and the error names the field.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from cmt_core.presets import PRESETS

PresetName = Literal[tuple(PRESETS)]  # the UI renders a Literal as a dropdown
DdpProcesses = Annotated[int, Field(ge=1, le=1024)]

ARGS_DOC = """
    Args:
        preset: Named configuration (toy: 2-D mixture; digits: 8x8 digits, the default; toy-meanflow,
            digits-meanflow: the same with flow-map mid-training and Mean Flow post-training; cifar10, ffhq64,
            afhq64: the paper's recipes, see docs/recipes.md; cifar10-tiny: the CIFAR-10 recipe at toy size).
        overrides: Dotted `key=value` settings applied on top, as `cmt run --set`, e.g. `{example}`.
        config: A whole pipeline configuration used instead of the preset (the overrides still apply).
        artifact_root: Folder of the stage artifacts (default: the config's, `artifacts`); shared
            storage when workers run on several machines.
        ddp_processes: Processes of each training stage computed in this run; more than 1 runs it under
            torchrun (DDP).
"""
