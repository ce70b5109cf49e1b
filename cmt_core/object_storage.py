"""Artifacts on object storage: an ``artifact_root`` that is a URL (``s3://bucket/prefix``; any fsspec protocol
whose filesystem package is installed: ``pip install 'cmt[s3]'`` for S3 and S3-compatible servers).

The URL is the source of truth; a local mirror of it (``PipelineConfig.local_root``) is the working area:

* a stage computes in its mirror folder exactly as under a local root (checkpoints, resume, the lock), and
  ``publish_artifact`` then uploads its files and, last, its manifest: the completion rule is unchanged, an
  artifact without a manifest at the URL is incomplete;
* the trajectory store (``STORE_DIR``) is the exception: the rollouts write it in place at the URL (every dask
  worker writes its own shards there, one object per shard) and mid-training streams it from there through
  zarr's ``FsspecStore``; it is never uploaded, fetched or held in the mirror;
* ``fetch_artifact`` brings a complete artifact's other files into the mirror (a later stage's inputs, a cached
  stage's report) and checks each against the sha256 in the manifest;
* ``verify_remote`` checks, from one listing, that every file the manifest records is there with its size.

Credentials and the endpoint come from the environment, as for any S3 client (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for a server that is not AWS, ...), never from the config, so they
appear in no artifact id, manifest or log. Object stores have no rename and no advisory locks: one process per
machine computes an artifact (the mirror folder's lock); two machines that compute the same artifact at once
both write the same bytes (every stage is deterministic) and the manifest written last stands.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import fsspec

from cmt_core.artifacts import (
    MANIFEST,
    STORE_DIR,
    ManifestError,
    artifact_lock,
    file_hash,
    manifest_problem,
    publish,
    publish_text,
    read_manifest,
)

log = logging.getLogger("cmt")
Location = Path | str  # a local folder (Path) or a URL (str)


def is_url(location) -> bool:
    """True for ``scheme://...`` locations other than ``file://`` (those are local paths)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def location(value) -> Location:
    """``value`` as a location: a URL stays a string (without a trailing ``/``), anything else becomes a ``Path``.
    A URL must name a bucket (or host): ``ValueError`` for ``s3://``."""
    if not is_url(value):
        return Path(value)
    scheme, rest = str(value).split("://", 1)
    if not rest.strip("/"):
        raise ValueError(f"{value!r} names no bucket; use {scheme}://bucket/prefix")
    return f"{scheme}://{rest.rstrip('/')}"


def join(location: Location, *parts: str) -> Location:
    """``location / part / ...``: a ``Path`` for a local folder, a URL joined with ``/`` for a URL."""
    if is_url(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return Path(location).joinpath(*parts)


def filesystem(url: str):
    """``(fsspec filesystem, path inside it)`` of ``url``; names the package to install for its protocol."""
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as err:
        raise ImportError(f"{url}: {err} (pip install 'cmt[s3]' for s3:// URLs)") from err


def default_mirror(url: str) -> Path:
    """The local mirror of ``url`` when the config sets no ``cache_root``: ``$XDG_CACHE_HOME/cmt/<url>``
    (``~/.cache/cmt/s3/bucket/prefix`` for ``s3://bucket/prefix``)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cmt" / str(url).replace("://", "/").rstrip("/")


def remote_manifest(url: str) -> dict | None:
    """The manifest of the complete artifact at ``url``, or None (absent); ``ManifestError`` when the object is
    there but is not JSON or not of a manifest's shape."""
    fs, path = filesystem(url)
    try:
        manifest = json.loads(fs.cat_file(f"{path}/{MANIFEST}"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ManifestError(f"{url}/{MANIFEST} is not JSON") from None
    problem = manifest_problem(manifest)
    if problem:
        raise ManifestError(f"{url}/{MANIFEST}: {problem}")
    return manifest


def remove_manifest(url: str) -> None:
    """Mark the artifact at ``url`` incomplete (before it is computed again)."""
    fs, path = filesystem(url)
    try:
        fs.rm_file(f"{path}/{MANIFEST}")
    except FileNotFoundError:
        pass


def sizes(url: str) -> dict[str, int]:
    """``{path relative to url: bytes}`` of every object under ``url`` (one listing)."""
    fs, path = filesystem(url)
    path = path.rstrip("/")
    try:
        found = fs.find(path, detail=True)
    except FileNotFoundError:
        return {}
    return {name[len(path) + 1:]: int(info["size"]) for name, info in found.items() if info.get("type") != "directory"}


def store_records(url: str) -> dict[str, dict]:
    """Manifest records (``{"bytes"}``, no sha256: chunks carry crc32c) of the store the rollouts wrote at
    ``url/STORE_DIR``."""
    return {f"{STORE_DIR}/{rel}": {"bytes": size} for rel, size in sorted(sizes(join(url, STORE_DIR)).items())}


def verify_remote(url: str, manifest: dict) -> str | None:
    """None when every file the manifest records is at ``url`` with its size, else the first problem."""
    found = sizes(url)
    for rel, record in manifest.get("files", {}).items():
        if rel not in found:
            return f"{url}/{rel} is missing"
        if found[rel] != record["bytes"]:
            return f"{url}/{rel} has {found[rel]} bytes, the manifest recorded {record['bytes']}"
    return None


def _staged(rel: str) -> bool:
    """Files that travel between the mirror and the URL: all but the store (written and read in place)."""
    return rel.split("/")[0] != STORE_DIR


def publish_artifact(local: Path, url: str) -> None:
    """Upload the complete artifact in the mirror folder ``local`` to ``url``: every file its manifest records
    (but the store, already there), then the manifest, last."""
    manifest = read_manifest(local)
    if manifest is None:
        raise FileNotFoundError(f"{local} has no manifest: only a complete artifact is published")
    fs, path = filesystem(url)
    files = [rel for rel in manifest["files"] if _staged(rel)]
    for rel in files:
        fs.put_file(str(Path(local) / rel), f"{path}/{rel}")
    fs.put_file(str(Path(local) / MANIFEST), f"{path}/{MANIFEST}")
    log.info("published %s (%d files, manifest last)", url, len(files))


def fetch_artifact(url: str, local: Path) -> dict:
    """Bring the complete artifact at ``url`` into the mirror folder ``local`` (the store stays at the URL);
    files already there with the recorded sha256 are kept. Returns its manifest. Raises ``FileNotFoundError``
    when ``url`` holds no complete artifact and ``ValueError`` when a downloaded file fails its sha256."""
    manifest = remote_manifest(url)
    if manifest is None:
        raise FileNotFoundError(f"{url} holds no complete artifact (no {MANIFEST})")
    local = Path(local)
    try:
        if read_manifest(local) == manifest:
            return manifest
    except ManifestError:  # a damaged mirror copy: fetched again below
        pass
    fs, path = filesystem(url)
    with artifact_lock(local, f"{local}: another process is fetching {url}; waiting"):
        local.mkdir(parents=True, exist_ok=True)
        (local / MANIFEST).unlink(missing_ok=True)
        fetched = 0
        for rel, record in manifest["files"].items():
            target = local / rel
            if not _staged(rel) or (target.is_file() and file_hash(target) == record.get("sha256")):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            publish(target, lambda tmp, rel=rel: fs.get_file(f"{path}/{rel}", str(tmp)))
            if "sha256" in record and file_hash(target) != record["sha256"]:
                target.unlink()
                raise ValueError(f"{url}/{rel} does not match its sha256 in the manifest (changed or damaged); "
                                 f"remove {url}/{MANIFEST} to have the stage recomputed")
            fetched += 1
        publish_text(local / MANIFEST, json.dumps(manifest, indent=2, default=str))
    log.info("fetched %s into %s (%d files)", url, local, fetched)
    return manifest
