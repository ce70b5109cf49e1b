"""Repairing the trajectory store of a complete rollouts artifact in place (``cmt store verify --repair``).

``repair_store(store)`` recomputes the bad or missing shards of ``<root>/rollouts/<id>/store.zarr`` from their
seeds, under the artifact's lock, with the teacher and rollout settings its manifest records, so the recomputed
shards equal the lost ones; then it verifies the store and publishes the artifact again.
"""

from __future__ import annotations

from pathlib import Path

from cmt_core import object_storage as remote
from cmt_core.artifacts import MANIFEST, artifact_lock, read_manifest, write_manifest
from cmt_core.config import PipelineConfig
from cmt_core.errors import StageError
from cmt_core.stages import solve_rollouts
from cmt_core.trajectories.verify import reset_bad_shards, verify_store


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


def repair_store(store: Path) -> list[int]:
    """Recompute the bad or missing shards of the store of a rollouts artifact and publish the artifact again;
    returns the shards recomputed (module docstring)."""
    if remote.is_url(store):
        raise ValueError(f"{store}: --repair works on a local store; for one on object storage rerun the pipeline "
                         "after removing the rollouts manifest: the stage recomputes only the bad shards")
    store = Path(store)
    folder = store.parent
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("stage") != "rollouts":
        raise ValueError(f"{store} is not the store of a complete rollouts artifact (no rollouts manifest in "
                         f"{folder}): --repair recomputes shards from that manifest; rerun the rollouts stage instead")
    teacher = folder.parent.parent / "teacher" / manifest["inputs"]["teacher"]
    if read_manifest(teacher) is None:
        raise ValueError(f"{store}: its teacher artifact {teacher} is not complete; rerun the teacher stage first")
    c = _config_of(manifest["config"])
    with artifact_lock(folder, f"rollouts: another process is writing {folder}; waiting"):
        (folder / MANIFEST).unlink(missing_ok=True)  # incomplete while it is repaired
        bad = reset_bad_shards(store)
        solve_rollouts(c, store, teacher)
        report = verify_store(store)
        if not report.ok:
            raise StageError(f"rollouts: {store} still fails verification after the repair: {report.summary()}")
        write_manifest(folder, "rollouts", manifest["artifact_id"], manifest["config"], manifest["inputs"],
                       manifest["metrics"], manifest["seconds"], manifest.get("device"))
    return bad
