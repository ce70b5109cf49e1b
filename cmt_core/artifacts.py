"""Artifact bookkeeping: every stage output lives at ``<root>/<stage>/<artifact_id>/``.

``artifact_id`` hashes the stage's validated config, the ids of its inputs and ``FORMAT_VERSION``; the
same inputs always map to the same folder. A stage works inside that folder (checkpoints make it
resumable) and writes ``manifest.json`` last, atomically: a folder without a manifest is incomplete and
is never read as a result. The disk is the source of truth; orchestrators only add caching on top.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

FORMAT_VERSION = 3
PACKAGES = ("torch", "zarr", "dask", "numcodecs", "prefect", "pydantic", "clean-fid", "numpy")


def artifact_id(stage: str, config: dict, inputs: dict[str, str]) -> str:
    """Content hash (16 hex digits) of a stage's config and input artifact ids."""
    blob = json.dumps({"stage": stage, "config": config, "inputs": inputs, "format": FORMAT_VERSION},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def artifact_dir(root: Path, stage: str, aid: str) -> Path:
    return Path(root) / stage / aid


def read_manifest(path: Path) -> dict | None:
    """The manifest of a complete artifact, or None when the artifact is absent or incomplete."""
    try:
        return json.loads((Path(path) / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def package_versions(names=PACKAGES) -> dict[str, str]:
    """Installed versions of ``names`` (packages that are not installed are left out)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def provenance() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"versions": package_versions(), "git_commit": commit, "python": platform.python_version(),
            "host": platform.node(), "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_manifest(path: Path, stage: str, aid: str, config: dict, inputs: dict, metrics: dict,
                   seconds: float, device: str | None = None) -> dict:
    """Mark the artifact at ``path`` complete (atomic replace of ``manifest.json``)."""
    manifest = {"stage": stage, "artifact_id": aid, "config": config, "inputs": inputs, "metrics": metrics,
                "seconds": seconds, "device": device, "format": FORMAT_VERSION, **provenance()}
    tmp = Path(path) / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, Path(path) / "manifest.json")
    return manifest
