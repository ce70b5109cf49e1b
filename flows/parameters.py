"""The parameters every flow takes; they resolve to one validated config by ``cmt_core.presets.resolve_config``.

In the Prefect UI a run's form shows, in this order:

* ``preset``: a dropdown of the named presets (``cmt_core.presets``);
* ``overrides``: a list of ``key.path=value`` strings applied on top, as ``cmt run --set`` does
  (e.g. ``midtrain.train.lr=1e-4``, ``rollout.cluster.address=tcp://10.0.0.5:8786``);
* ``config``: optional, a whole ``PipelineConfig`` as a nested form (every stage's model, its ranges and
  choices), used instead of the preset; the overrides still apply on top;
* ``artifact_root``: where artifacts live (shared storage when workers are on several machines);
* ``ddp_processes``: processes per node of each training stage that computes (``torchrun`` when > 1); it sets
  ``launch.procs_per_node``, and the config's ``launch`` section holds the rest (nodes, rendezvous).

The API checks every typed value against the schema when a run is created (an unknown preset, a negative
``steps`` inside ``config``, ``ddp_processes=0``, ... are rejected); overrides are validated by the same
pydantic models before any stage starts, and the error names the field.

Paths from parameters are confined (``flow_config``): ``artifact_root``, ``data.path``, ``teacher.path``,
``midtrain.lpips_backbone``, ``eval.inception_path``, ``eval.reference_stats`` (and a comparison's ``out_dir``,
the paths of ``cmt-sample``'s job) must resolve, symlinks and ``..`` followed, inside one of the allowed roots:
the folders in ``CMT_ALLOWED_ROOTS`` (separated by ``:``) on the machine that runs the flow, by default its
working directory. An ``artifact_root`` on object storage
(``s3://bucket/prefix``) must lie under one of the URL prefixes in ``CMT_ALLOWED_URLS`` (separated by spaces;
none by default) and ``cache_root``, its local mirror, inside an allowed root. Anyone who can create a flow run
chooses these values; the roots are the folders and buckets they may read and write with the worker's rights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from cmt_core.config import PATH_FIELDS, PipelineConfig
from cmt_core.errors import brief, config_message, describe
from cmt_core.object_storage import is_url
from cmt_core.presets import PRESETS, resolve_config

ALLOWED_ROOTS_ENV = "CMT_ALLOWED_ROOTS"
ALLOWED_URLS_ENV = "CMT_ALLOWED_URLS"

PresetName = Literal[tuple(PRESETS)]  # the UI renders a Literal as a dropdown
DdpProcesses = Annotated[int, Field(ge=1, le=1024)]

ARGS_DOC = """
    Args:
        preset: Named configuration (toy: 2-D mixture; digits: 8x8 digits, the default; toy-meanflow,
            digits-meanflow: the same with flow-map mid-training and Mean Flow post-training; cifar10, ffhq64,
            afhq64: the paper's recipes, see docs/recipes.md; cifar10-tiny: the CIFAR-10 recipe at toy size).
        overrides: Dotted `key=value` settings applied on top, as `cmt run --set`, e.g. `{example}`.
        config: A whole pipeline configuration used instead of the preset (the overrides still apply).
        artifact_root: Folder of the stage artifacts (default: the config's, `artifacts`), or a URL on
            object storage (`s3://bucket/prefix`); shared storage when workers run on several machines.
        ddp_processes: Processes per node of each training stage computed in this run; more than 1 runs it
            under torchrun (DDP). Sets launch.procs_per_node; launch.nodes > 1 (in config or overrides) makes
            this run's node one of several meeting at launch.rdzv_endpoint.
"""


def allowed_roots() -> list[Path]:
    """The folders flow parameters may name (``CMT_ALLOWED_ROOTS``, default: the working directory), resolved."""
    roots = [r for r in os.environ.get(ALLOWED_ROOTS_ENV, "").split(os.pathsep) if r]
    return [Path(r).resolve() for r in roots or [os.getcwd()]]


def allowed_urls() -> list[str]:
    """The URL prefixes an object-storage ``artifact_root`` may lie under (``CMT_ALLOWED_URLS``, default none)."""
    return [u.rstrip("/") for u in os.environ.get(ALLOWED_URLS_ENV, "").split() if u]


def confine(field: str, value: str | Path) -> None:
    """Refuse a path parameter that does not resolve inside an allowed root (``..`` and symlinks followed), or a
    URL that is not under an allowed URL prefix."""
    if is_url(value):
        url, prefixes = str(value).rstrip("/"), allowed_urls()
        if ".." in url.split("/") or not any(url == p or url.startswith(p + "/") for p in prefixes):
            raise ValueError(f"{field}={str(value)!r} is not under an allowed URL prefix {prefixes}; extend "
                             f"{ALLOWED_URLS_ENV} (URL prefixes separated by spaces) on the machine that runs the flow")
        return
    try:
        resolved, roots = Path(value).resolve(), allowed_roots()
    except (OSError, RuntimeError, ValueError) as err:  # a link loop, a NUL byte, a name over the limit
        raise ValueError(f"{field}={brief(str(value))} cannot be resolved: {describe(err)}") from None
    if not any(resolved == root or root in resolved.parents for root in roots):
        raise ValueError(f"{field}={str(value)!r} resolves to {resolved}, outside the allowed roots "
                         f"{[str(r) for r in roots]}; use a path inside them or extend {ALLOWED_ROOTS_ENV} "
                         f"on the machine that runs the flow")


def path_values(cfg: PipelineConfig) -> dict[str, str]:
    """The path fields of ``cfg`` that are set, by dotted name."""
    values = {}
    for field in PATH_FIELDS:
        value = cfg
        for key in field.split("."):
            value = getattr(value, key)
        if value is not None:
            values[field] = str(value)
    return values


def confine_config(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` when every path field it holds is inside an allowed root (``confine``), else ``ValueError``."""
    for field, value in path_values(cfg).items():
        confine(field, value)
    return cfg


def trust_paths(cfg: PipelineConfig) -> None:
    """Add the path fields of ``cfg`` to this process's allowed roots (``cmt-flow``: paths typed in one's own
    shell need no permission; flows started from the UI or the API run in workers without it)."""
    values = path_values(cfg).values()
    extra = [Path(value).resolve() for value in values if not is_url(value)]
    os.environ[ALLOWED_ROOTS_ENV] = os.pathsep.join(str(r) for r in [*allowed_roots(), *extra])
    os.environ[ALLOWED_URLS_ENV] = " ".join([*allowed_urls(), *(v.rstrip("/") for v in values if is_url(v))])


def flow_config(preset: str, overrides, config: PipelineConfig | None, artifact_root: str | None,
                ddp_processes: int = 1) -> PipelineConfig:
    """The validated, confined config of a flow's parameters (``ddp_processes > 1`` sets
    ``launch.procs_per_node``); a bad value raises ``ValueError`` with the same one-line message the command
    line prints (``cmt_core.errors.config_message``)."""
    if ddp_processes > 1:
        overrides = [*overrides, f"launch.procs_per_node={ddp_processes}"]
    try:
        return confine_config(resolve_config(preset, overrides, config, artifact_root))
    except ValueError as err:
        raise ValueError(config_message(err)) from None
