"""Repairing the trajectory store of a complete rollouts artifact in place (``cmt store verify --repair``).

``repair_store(store)`` recomputes the bad or missing shards of ``<root>/rollouts/<id>/store.zarr`` from their
seeds, under the artifact's lock, with the teacher and rollout settings its manifest records, so the recomputed
shards equal the lost ones; then it verifies the store and publishes the artifact again.

A repair that cannot be done leaves what it found: the manifest, the teacher artifact and the teacher itself are
checked (the teacher loaded and asked to denoise) before anything is touched, and a failure while recomputing puts
back the manifest, the store's attributes and the done markers of the shards it had reset.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from cmt_core import object_storage as remote
from cmt_core.artifacts import MANIFEST, artifact_lock, publish, read_manifest, write_manifest
from cmt_core.config import PipelineConfig
from cmt_core.errors import StageError, brief, describe
from cmt_core.stages import model_space, rollout_teacher, solve_rollouts
from cmt_core.trajectories.store import open_store
from cmt_core.trajectories.verify import mark_verified, reset_bad_shards


def _config_of(values: dict) -> PipelineConfig:
    """A pipeline config holding the dotted ``values`` of a manifest's ``config`` (the rest: defaults)."""
    nested: dict = {}
    for path, value in values.items():
        *parents, leaf = path.split(".")
        node = nested
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    if nested.get("teacher", {}).get("source") == "callable":  # it ran before, under allow_code
        nested["teacher"]["allow_code"] = True
    return PipelineConfig.model_validate(nested)


def _check_teacher(c: PipelineConfig, inputs: dict[str, Path]) -> None:
    """The (guided) teacher of ``c`` loads from the input artifact folders ``inputs`` and denoises two zero
    samples."""
    teacher = inputs["teacher"]
    try:
        denoiser = rollout_teacher(c, inputs)()
        with torch.no_grad():
            out = denoiser(torch.zeros(2, *model_space(c)[0]), torch.ones(2))
        if not torch.isfinite(out).all():
            raise ValueError("it answers inf or NaN")
    except Exception as err:  # a damaged model file, a teacher that no longer loads
        raise ValueError(f"its teacher (artifact {teacher}) cannot be used: {describe(err)}; nothing was changed. "
                         "Rerun the teacher stage first") from err


def repair_store(store: Path) -> list[int]:
    """Recompute the bad or missing shards of the store of a rollouts artifact and publish the artifact again;
    returns the shards recomputed (module docstring). Raises ``ValueError`` (nothing changed) when it cannot."""
    if remote.is_url(store):
        raise ValueError(f"{store}: --repair works on a local store; for one on object storage rerun the pipeline "
                         "after removing the rollouts manifest: the stage recomputes only the bad shards")
    store = Path(store)
    folder = store.parent
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("stage") != "rollouts":
        raise ValueError(f"{store} is not the store of a complete rollouts artifact (no rollouts manifest in "
                         f"{folder}): --repair recomputes shards from that manifest; rerun the rollouts stage instead")
    if not (set(manifest["inputs"]) <= {"teacher", "guide"}
            and all(re.fullmatch(r"[0-9a-f]{1,64}", v) for v in manifest["inputs"].values())):
        raise ValueError(f"{folder / MANIFEST}: inputs {brief(manifest['inputs'])} are not a rollouts artifact's "
                         "(teacher and guide artifact ids)")
    inputs = {stage: folder.parent.parent / stage / str(artifact) for stage, artifact in manifest["inputs"].items()}
    for stage, path in inputs.items():
        if read_manifest(path) is None:
            raise ValueError(f"{store}: its {stage} artifact {path} is not complete; rerun the {stage} stage first")
    if "teacher" not in inputs:
        raise ValueError(f"{folder / MANIFEST} names no teacher artifact among its inputs: not a rollouts manifest")
    try:
        c = _config_of(manifest["config"])
    except ValueError as err:
        raise ValueError(f"{folder / MANIFEST}: its config is not a valid pipeline config: {describe(err)}") from None
    _check_teacher(c, inputs)
    with artifact_lock(folder, f"rollouts: another process is writing {folder}; waiting"):
        saved, attrs = (folder / MANIFEST).read_bytes(), dict(open_store(store, partial=True).attrs)
        bad = []
        try:
            (folder / MANIFEST).unlink()  # incomplete while it is repaired
            bad = reset_bad_shards(store)
            solve_rollouts(c, store, inputs)
            report = mark_verified(store)
            if not report.ok:
                raise StageError(f"rollouts: {store} still fails verification after the repair: "
                                 f"{report.summary().splitlines()[-1]}")
            write_manifest(folder, "rollouts", manifest["artifact_id"], manifest["config"], manifest["inputs"],
                           manifest["metrics"], manifest.get("seconds_by_call") or [manifest.get("seconds") or 0.0],
                           manifest.get("device"))
        except BaseException:
            group = open_store(store, partial=True).group
            group.update_attributes(attrs)
            for shard in bad:
                group["shard_done"][shard] = 1
            publish(folder / MANIFEST, lambda tmp: tmp.write_bytes(saved))
            raise
    return bad
