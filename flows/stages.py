"""One flow per stage: ``cmt-teacher``, ``cmt-rollouts``, ``cmt-midtrain``, ``cmt-posttrain``, ``cmt-evaluation``.

A stage flow runs its stage and, first, whatever the stage reads that is not complete yet (complete inputs
are reused at once), so each can be started on its own: e.g. mid-training on more DDP processes, or
evaluation with other settings, on artifacts an earlier pipeline run left.
"""

from __future__ import annotations

from prefect import flow

from cmt_core.config import PipelineConfig
from cmt_core.pipeline import StageResult
from flows.parameters import DdpProcesses, PresetName, resolve_config
from flows.pipeline import run_stages


@flow(name="cmt-teacher")
def cmt_teacher(preset: PresetName = "digits", overrides: tuple[str, ...] = (),
                config: PipelineConfig | None = None, artifact_root: str | None = None) -> dict[str, StageResult]:
    """The teacher: EDM pre-training (or a loaded / exact teacher).

    Args:
        preset: Named configuration (toy, digits, cifar10, cifar10-tiny).
        overrides: Dotted `key=value` settings applied on top, e.g. `teacher.train.steps=8000`.
        config: A whole pipeline configuration used instead of the preset (the overrides still apply).
        artifact_root: Folder of the stage artifacts (default: the config's, `artifacts`).
    """
    return run_stages(resolve_config(preset, overrides, config, artifact_root), ["teacher"])


@flow(name="cmt-rollouts")
def cmt_rollouts(preset: PresetName = "digits", overrides: tuple[str, ...] = (),
                 config: PipelineConfig | None = None, artifact_root: str | None = None) -> dict[str, StageResult]:
    """Teacher ODE rollouts on dask: a LocalCluster, or the scheduler at `rollout.cluster.address`.

    Args:
        preset: Named configuration (toy, digits, cifar10, cifar10-tiny).
        overrides: Dotted `key=value` settings applied on top, e.g. `rollout.cluster.address=tcp://host:8786`.
        config: A whole pipeline configuration used instead of the preset (the overrides still apply).
        artifact_root: Folder of the stage artifacts (default: the config's, `artifacts`).
    """
    return run_stages(resolve_config(preset, overrides, config, artifact_root), ["rollouts"])


@flow(name="cmt-midtrain")
def cmt_midtrain(preset: PresetName = "digits", overrides: tuple[str, ...] = (),
                 config: PipelineConfig | None = None, artifact_root: str | None = None,
                 ddp_processes: DdpProcesses = 1) -> dict[str, StageResult]:
    """Consistency mid-training (CMT) on the teacher's rollouts, optionally on several DDP processes.

    Args:
        preset: Named configuration (toy, digits, cifar10, cifar10-tiny).
        overrides: Dotted `key=value` settings applied on top, e.g. `midtrain.train.lr=1e-4`.
        config: A whole pipeline configuration used instead of the preset (the overrides still apply).
        artifact_root: Folder of the stage artifacts (default: the config's, `artifacts`).
        ddp_processes: Mid-training processes; more than 1 runs it under torchrun (DDP).
    """
    return run_stages(resolve_config(preset, overrides, config, artifact_root), ["midtrain"], ddp_processes)


@flow(name="cmt-posttrain")
def cmt_posttrain(preset: PresetName = "digits", overrides: tuple[str, ...] = (),
                  config: PipelineConfig | None = None, artifact_root: str | None = None,
                  ddp_processes: DdpProcesses = 1) -> dict[str, StageResult]:
    """Post-training (ECT / ECD / Mean Flow) from the CMT, teacher or random initialisation.

    Args:
        preset: Named configuration (toy, digits, cifar10, cifar10-tiny).
        overrides: Dotted `key=value` settings applied on top, e.g. `posttrain.method=ecd`.
        config: A whole pipeline configuration used instead of the preset (the overrides still apply).
        artifact_root: Folder of the stage artifacts (default: the config's, `artifacts`).
        ddp_processes: Mid-training processes, if mid-training has to run first.
    """
    return run_stages(resolve_config(preset, overrides, config, artifact_root), ["posttrain"], ddp_processes)


@flow(name="cmt-evaluation")
def cmt_evaluation(preset: PresetName = "digits", overrides: tuple[str, ...] = (),
                   config: PipelineConfig | None = None, artifact_root: str | None = None,
                   ddp_processes: DdpProcesses = 1) -> dict[str, StageResult]:
    """Evaluation of the teacher, CMT and post-trained models: results table, sample grids, curves.

    Args:
        preset: Named configuration (toy, digits, cifar10, cifar10-tiny).
        overrides: Dotted `key=value` settings applied on top, e.g. `eval.num_samples=10000`.
        config: A whole pipeline configuration used instead of the preset (the overrides still apply).
        artifact_root: Folder of the stage artifacts (default: the config's, `artifacts`).
        ddp_processes: Mid-training processes, if mid-training has to run first.
    """
    return run_stages(resolve_config(preset, overrides, config, artifact_root), ["evaluation"], ddp_processes)
