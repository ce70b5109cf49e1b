"""Artifact bookkeeping: every stage output lives at ``<root>/<stage>/<artifact_id>/``.

``artifact_id`` hashes the stage's validated config, the ids of its inputs and ``FORMAT_VERSION``; the
same inputs always map to the same folder. A stage works inside that folder (checkpoints make it
resumable) and writes ``manifest.json`` last, atomically: a folder without a manifest is incomplete and
is never read as a result. The disk is the source of truth; orchestrators only add caching on top. An
``artifact_root`` on object storage (``s3://...``) keeps this layout and rule there, with this module's files
written in a local mirror first (``cmt_core.object_storage``).

Durability: every file is published by ``publish`` (a temporary file with a unique name in the same folder,
fsynced, then ``os.replace`` and an fsync of the folder), so a crash or a full disk leaves either the old
file or the new one, never a torn one. The manifest records every file of the artifact with its size, and
its sha256 outside the trajectory store (whose chunks carry their own checksums, ``cmt store verify``);
``verify_files`` checks them before an artifact is reused. ``artifact_lock`` makes one process the writer
of an artifact folder: a second run with the same parameters waits for it, then reuses the result.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from filelock import FileLock

log = logging.getLogger("cmt")

FORMAT_VERSION = 3
MANIFEST = "manifest.json"
STORE_DIR = "store.zarr"  # the trajectory store: recorded by size only, its chunks carry their own checksums
MODEL_FILE = "model.pt"  # a teacher's or training stage's model (``cmt_core.models.save_model``)
LATENTS_DIR = "latents.zarr"  # an encoded data set (``cmt_core.data.encoded``): recorded by size, like the store
ENCODER_FILE = "encoder.json"  # the encoder stage's settings that rebuild the encoder (``cmt_core.encoders``)
VAE_DIR = "vae"  # an autoencoder trained here, in diffusers' format (``cmt_core.autoencoder``)
# the folders an artifact root holds beside the stages' own: run logs, feature statistics, Prefect's results
LOGS_DIR, FEATURES_DIR, RESULTS_DIR = "logs", "features", "prefect-results"
# a training stage's TensorBoard event files (``cmt_core.events``): a view of the run, like its logs, so not a result
# the manifest records (their names and records hold wall times; deleting them leaves the artifact complete)
EVENTS_DIR = "tensorboard"
LOCK_SUFFIX = ".lock"
SECONDS_LEDGER = ".seconds.json"  # the wall seconds of every call that worked on an unfinished artifact (``engine``)
PACKAGES = ("torch", "zarr", "dask", "numcodecs", "prefect", "pydantic", "clean-fid", "numpy")


def artifact_id(stage: str, config: dict, inputs: dict[str, str]) -> str:
    """Content hash (16 hex digits) of a stage's config and input artifact ids."""
    blob = json.dumps({"stage": stage, "config": config, "inputs": inputs, "format": FORMAT_VERSION},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def artifact_dir(root: Path, stage: str, aid: str) -> Path:
    return Path(root) / stage / aid


MAX_MANIFEST_FILES = 1_000_000  # files one manifest may record (a store of 2.4M trajectories has a few thousand)


class ManifestError(ValueError):
    """A manifest that is there but cannot be trusted (not JSON, or not of the manifest's shape); the message names
    the file and the field. The artifact is not complete: it is recomputed."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _file_record_problem(rel, record) -> str | None:
    parts = rel.split("/") if isinstance(rel, str) else None
    if not parts or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        return f"files: {str(rel)[:80]!r} is not a path inside the artifact"
    if not isinstance(record, dict) or not _is_int(record.get("bytes")) or record["bytes"] < 0:
        return f"files[{rel!r}].bytes must be a non-negative integer"
    digest = record.get("sha256")
    if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        return f"files[{rel!r}].sha256 must be 64 hexadecimal digits"
    return None


def manifest_problem(manifest) -> str | None:
    """What makes ``manifest`` (parsed JSON) not a manifest of the shape ``write_manifest`` writes, naming the
    field; None when it is one. Files are bounded in number and must lie inside the artifact."""
    if not isinstance(manifest, dict):
        return f"holds a JSON {type(manifest).__name__}, not an object"
    for field, kinds in (("stage", str), ("artifact_id", str), ("config", dict), ("inputs", dict),
                         ("metrics", dict)):
        if not isinstance(manifest.get(field), kinds):
            return f"{field} must be a JSON {'string' if kinds is str else 'object'}"
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in manifest["inputs"].items()):
        return "inputs must map stage names to artifact ids"
    seconds = manifest.get("seconds")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))):
        return "seconds must be a number"
    calls = manifest.get("seconds_by_call", [])  # older formats have none
    if not isinstance(calls, list) or any(isinstance(c, bool) or not isinstance(c, (int, float)) for c in calls):
        return "seconds_by_call must be a list of numbers"
    files = manifest.get("files", {})  # older formats have no file list
    if not isinstance(files, dict) or len(files) > MAX_MANIFEST_FILES:
        return f"files must be an object of at most {MAX_MANIFEST_FILES} records"
    return next((p for p in (_file_record_problem(rel, rec) for rel, rec in files.items()) if p), None)


def read_manifest(path: Path) -> dict | None:
    """The manifest of a complete artifact, or None when the artifact is absent or incomplete (no manifest);
    ``ManifestError`` when one is there but is not JSON or not of a manifest's shape (``manifest_problem``)."""
    file = Path(path) / MANIFEST
    try:
        text = file.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as err:  # a loop of links, a FIFO in its place, a damaged file
        raise ManifestError(f"{file} cannot be read: {type(err).__name__}") from None
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise ManifestError(f"{file} is not JSON") from None
    problem = manifest_problem(manifest)
    if problem:
        raise ManifestError(f"{file}: {problem}")
    return manifest


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(path: Path, write: Callable[[Path], None]) -> None:
    """Create ``path`` atomically and durably: ``write(tmp)`` fills a temporary file with a unique name in the
    same folder, which is fsynced, renamed over ``path`` and the folder fsynced. On any error (a full disk
    too) the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def publish_text(path: Path, text: str) -> None:
    publish(path, lambda tmp: tmp.write_text(text))


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # keyed by size and mtime: one hash per version
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hash(path: Path) -> str:
    stat = Path(path).stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def file_records(folder: Path) -> dict[str, dict]:
    """``{relative path: {"bytes", "sha256"}}`` of every file under ``folder`` but the manifest, lock files,
    temporary files and the event log (``EVENTS_DIR``); files of the trajectory store (``STORE_DIR``) and of a
    latent store (``LATENTS_DIR``) get no sha256 (their chunks carry checksums)."""
    folder, records = Path(folder), {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST or path.name.startswith(".") or path.name.endswith((".tmp", LOCK_SUFFIX)):
            continue
        if rel.split("/")[0] == EVENTS_DIR:
            continue
        records[rel] = {"bytes": path.stat().st_size}
        if rel.split("/")[0] not in (STORE_DIR, LATENTS_DIR):
            records[rel]["sha256"] = file_hash(path)
    return records


def verify_files(folder: Path, manifest: dict) -> str | None:
    """None when every file the manifest records is there with its size and sha256, else what is wrong (the
    first problem, naming the file). Manifests without a file list (older formats) pass."""
    for rel, record in manifest.get("files", {}).items():
        path = Path(folder) / rel
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != record["bytes"]:
            return f"{path} has {size} bytes, the manifest recorded {record['bytes']}"
        if "sha256" in record and file_hash(path) != record["sha256"]:
            return f"{path} does not match its sha256 in the manifest (the file was changed or damaged)"
    return None


@contextlib.contextmanager
def artifact_lock(path: Path, poll_message: str | None = None):
    """Hold the lock of the artifact folder ``path`` (the file ``<path>.lock`` beside it, ``filelock``'s
    OS-level lock: released when the process dies, also by SIGKILL). Logs ``poll_message`` once when
    another process holds it, then waits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + LOCK_SUFFIX)
    try:
        lock.acquire(timeout=0)
    except TimeoutError:
        log.info("%s", poll_message or f"{path}: another process is writing it; waiting")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


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


def read_call_seconds(path: Path) -> list[float]:
    """The wall seconds of the earlier calls that worked on the unfinished artifact at ``path`` (its
    ``SECONDS_LEDGER``; killed and failed calls included), ``[]`` when there is none. A ledger that is not a list
    of non-negative numbers is named in a warning and read as ``[]``: it only costs a figure, never a result."""
    file = Path(path) / SECONDS_LEDGER
    try:
        calls = json.loads(file.read_text())["seconds_by_call"]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("%s is not a seconds ledger (%s); the earlier calls' seconds are not counted", file, err)
        return []
    if not isinstance(calls, list) or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and c >= 0
                                              for c in calls):
        log.warning("%s: seconds_by_call must be a list of non-negative numbers; the earlier calls' seconds are "
                    "not counted", file)
        return []
    return [float(c) for c in calls]


def write_call_seconds(path: Path, calls: list[float]) -> None:
    """Publish the ledger of the artifact at ``path``: ``{"seconds_by_call": calls}``."""
    publish_text(Path(path) / SECONDS_LEDGER, json.dumps({"seconds_by_call": calls}))


def write_manifest(path: Path, stage: str, aid: str, config: dict, inputs: dict, metrics: dict,
                   seconds_by_call: list[float], device: str | None = None, elsewhere: dict | None = None) -> dict:
    """Mark the artifact at ``path`` complete: the manifest, with the record of every file (``file_records``,
    and ``elsewhere``: records of files the stage wrote at the artifact's URL, ``cmt_core.object_storage``),
    published last (``publish``). ``seconds`` is the wall time of every call that worked on it,
    ``seconds_by_call`` each call's; the ledger of an unfinished artifact (``SECONDS_LEDGER``) is removed."""
    files = {**file_records(path), **(elsewhere or {})}
    manifest = {"stage": stage, "artifact_id": aid, "config": config, "inputs": inputs, "metrics": metrics,
                "seconds": sum(seconds_by_call), "seconds_by_call": list(seconds_by_call), "device": device,
                "format": FORMAT_VERSION, "files": dict(sorted(files.items())), **provenance()}
    publish_text(Path(path) / MANIFEST, json.dumps(manifest, indent=2, default=str))
    (Path(path) / SECONDS_LEDGER).unlink(missing_ok=True)
    return manifest
