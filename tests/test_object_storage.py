"""Stores and artifacts on object storage, against a real S3-compatible server (moto) on 127.0.0.1 that the module
starts and stops (``tests/servers.py``): the store written at a URL and streamed from it, the completion rule
(manifest last) of published artifacts, a whole ``toy`` pipeline with its artifacts in a bucket and its rerun, and
the loader benchmark."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from s3fs import S3FileSystem
from zarr.abc.store import RangeByteRequest
from zarr.storage import FsspecStore

from cmt_core import object_storage as remote
from cmt_core.artifacts import MANIFEST, write_manifest
from cmt_core.config import RolloutConfig, SolverConfig, StoreConfig
from cmt_core.trajectories.dask_rollouts import run_rollouts
from cmt_core.trajectories.pairs import StorePairs
from cmt_core.trajectories.store import (
    IncompleteStoreError,
    WholeObjectStore,
    create_store,
    open_store,
    write_shard,
)
from cmt_core.trajectories.verify import verify_store
from tests.servers import make_bucket, s3_server
from tests.test_dask_rollouts import gmm_teacher

ROOT = Path(__file__).resolve().parents[1]
CMT = [sys.executable, "-m", "cmt_core.cli"]
CFG = RolloutConfig(solver=SolverConfig(name="dpm2m", steps=8), batch_size=16, seed=5,
                    store=StoreConfig(chunk_trajectories=8, shard_chunks=2))
STAGES = ("teacher", "rollouts", "midtrain", "posttrain", "evaluation")
SMALL = ["teacher.train.steps=200", "teacher.train.checkpoint_every=40", "rollout.num_trajectories=1024",
         "rollout.store.chunk_trajectories=16", "rollout.store.shard_chunks=2", "rollout.cluster.workers=1",
         "midtrain.train.steps=160", "midtrain.train.checkpoint_every=40", "midtrain.train.eval_every=80",
         "posttrain.train.steps=120", "posttrain.train.checkpoint_every=40", "posttrain.train.eval_every=60",
         "eval.num_samples=400", "cpu_threads=1"]


@pytest.fixture(scope="module")
def bucket():
    with s3_server():
        yield make_bucket("cmt-tests")


def test_a_store_written_at_a_url_equals_the_local_one_and_streams_the_same_batches(bucket, tmp_path):
    url = f"{bucket}/stream/store.zarr"
    local = run_rollouts(gmm_teacher, tmp_path / "store.zarr", 200, (2,), CFG, "gmm", in_process=True)
    assert run_rollouts(gmm_teacher, url, 200, (2,), CFG, "gmm", in_process=True) == url
    assert not (tmp_path / "s3:").exists()
    at_url, on_disk = open_store(url), open_store(local)
    assert np.array_equal(at_url.states[:], on_disk.states[:])  # bit-identical
    assert torch.equal(at_url.seeds, on_disk.seeds) and at_url.attrs["complete"]
    assert verify_store(url).ok
    # 200 trajectories x 8 points = 1600 pairs an epoch: 30 batches of 64 cross an epoch boundary
    streamed, read = StorePairs(url, to_end=False, seed=1), StorePairs(local, to_end=False, seed=1)
    for step in range(30):
        a, b = streamed.batch(step, 64, rank=1, world=2), read.batch(step, 64, rank=1, world=2)
        assert all(torch.equal(a[k], b[k]) for k in ("x_t", "t", "x_s", "s"))
    streamed.close()
    read.close()
    done = subprocess.run([*CMT, "store", "verify", url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and f"{url}: OK" in done.stdout, done.stdout + done.stderr



def test_a_store_that_fits_the_cache_is_fetched_one_object_per_shard(bucket, monkeypatch, caplog):
    url = f"{bucket}/whole/store.zarr"
    run_rollouts(gmm_teacher, url, 200, (2,), CFG, "gmm", in_process=True)
    requests, calls = [], []
    get, call = FsspecStore.get, S3FileSystem._call_s3

    async def counted(self, key, prototype, byte_range=None):
        if key.startswith("states/c/"):
            requests.append((key, byte_range))
        return await get(self, key, prototype, byte_range)

    async def api_call(self, method, *args, **kwargs):
        calls.append(method)
        return await call(self, method, *args, **kwargs)

    monkeypatch.setattr(FsspecStore, "get", counted)
    sizes = remote.sizes(url)
    half = sum(sizes.values()) // 2  # a cache smaller than the store: byte ranges instead
    caplog.clear()  # the rollouts' own INFO lines, when an earlier test set the logger to INFO
    with caplog.at_level("WARNING", logger="cmt"):
        whole = open_store(url)
        assert not caplog.records
        ranges = open_store(url, cache_bytes=half)
    assert isinstance(whole.group.store, WholeObjectStore) and not isinstance(ranges.group.store, WholeObjectStore)
    assert "read by byte ranges" in caplog.text and "chunk_trajectories" in caplog.text  # its chunks are ~100 B
    monkeypatch.setattr(S3FileSystem, "_call_s3", api_call)
    read = [whole.read_chunk(c) for c in range(whole.num_chunks)]
    # each shard once, whole, as the explicit range its listed size gives: one GET and no HEAD
    assert sorted(requests) == sorted((k, RangeByteRequest(0, sizes[k])) for k in sizes if k.startswith("states/c/"))
    assert calls == ["get_object"] * whole.num_shards
    requests.clear()
    assert all(torch.equal(a, ranges.read_chunk(c)) for c, a in enumerate(read))
    assert len(requests) == whole.num_chunks + whole.num_shards  # a range per chunk, and each shard's index


def test_a_store_being_written_at_a_url_is_incomplete_and_created_once(bucket):
    url = f"{bucket}/partial/store.zarr"
    store = create_store(url, 32, (2,), torch.linspace(80, 0, 9, dtype=torch.float64), CFG.store)
    write_shard(store, 0, torch.randn(16, 9, 2))
    with pytest.raises(IncompleteStoreError, match="1 of 2 shards"):
        open_store(url)
    with pytest.raises(FileExistsError):
        create_store(url, 32, (2,), torch.linspace(80, 0, 9, dtype=torch.float64), CFG.store)
    report = verify_store(url)
    assert not report.ok and report.missing_shards == [1]


def _artifact(folder: Path) -> Path:
    (folder / "train").mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"weights" * 100)
    (folder / "train" / "metrics.jsonl").write_text('{"step": 1}\n')
    write_manifest(folder, "midtrain", "abc", {}, {}, {"score": 1.0}, [0.1])
    return folder


def test_published_artifacts_are_complete_only_once_their_manifest_is_there(bucket, tmp_path, monkeypatch):
    local, url = _artifact(tmp_path / "work"), f"{bucket}/runs/midtrain/abc"
    fs, _ = remote.filesystem(url)
    real_put, calls = fs.put_file, []

    def dies_after_one_file(lpath, rpath, **kwargs):
        calls.append(rpath)
        if len(calls) > 1:
            raise OSError("connection lost")
        return real_put(lpath, rpath, **kwargs)

    monkeypatch.setattr(fs, "put_file", dies_after_one_file)  # the upload stops after its first file
    with pytest.raises(OSError, match="connection lost"):
        remote.publish_artifact(local, url)
    monkeypatch.undo()
    assert remote.remote_manifest(url) is None  # one file there, no manifest: incomplete
    remote.publish_artifact(local, url)
    manifest = remote.remote_manifest(url)
    assert manifest == json.loads((local / MANIFEST).read_text())
    assert remote.verify_remote(url, manifest) is None
    copy = tmp_path / "mirror"
    assert remote.fetch_artifact(url, copy) == manifest
    assert (copy / "model.pt").read_bytes() == (local / "model.pt").read_bytes()
    fs.pipe_file(fs._strip_protocol(url) + "/model.pt", b"WEIGHTS" * 100)  # same size, other bytes
    assert remote.verify_remote(url, manifest) is None  # sizes only: the sha256 is checked on fetch
    shutil.rmtree(copy)
    with pytest.raises(ValueError, match="model.pt does not match its sha256"):
        remote.fetch_artifact(url, copy)
    fs.pipe_file(fs._strip_protocol(url) + "/model.pt", b"short")
    assert "model.pt has 5 bytes" in remote.verify_remote(url, manifest)


def _run(root: str, mirror: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [*CMT, "run", "--preset", "toy", "--artifact-root", root, "--set", f"cache_root={mirror}"]
    for override in SMALL:
        args += ["--set", override]
    return subprocess.run([*args, *extra], capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.slow
def test_toy_pipeline_with_its_artifacts_in_a_bucket_and_a_rerun_that_computes_nothing(bucket, tmp_path):
    root, mirror = f"{bucket}/toy", tmp_path / "mirror"
    first = _run(root, mirror)
    assert first.returncode == 0, first.stderr[-3000:]
    fs, base = remote.filesystem(root)
    manifests = {}
    for stage in STAGES:
        (folder,) = fs.ls(f"{base}/{stage}")
        url = f"s3://{folder}"
        manifests[stage] = remote.remote_manifest(url)
        assert manifests[stage] is not None and remote.verify_remote(url, manifests[stage]) is None
        assert f"[{stage}] computed" in first.stdout and url in first.stdout
    rollouts = fs.ls(f"{base}/rollouts")[0]
    store_files = [f for f in manifests["rollouts"]["files"] if f.startswith("store.zarr/")]
    assert store_files and all("sha256" not in manifests["rollouts"]["files"][f] for f in store_files)
    assert open_store(f"s3://{rollouts}/store.zarr").complete  # written in place by the dask worker
    assert not list(mirror.rglob("store.zarr"))  # never staged in the mirror
    assert manifests["midtrain"]["device"] == "cpu"

    shutil.rmtree(mirror)  # another machine: nothing local
    again = _run(root, mirror)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in STAGES:
        assert f"[{stage}] cached" in again.stdout
        (folder,) = fs.ls(f"{base}/{stage}")
        assert remote.remote_manifest(f"s3://{folder}") == manifests[stage]  # not written again
    assert "published" not in again.stderr
    report = next(mirror.glob("evaluation/*/report.md"))  # fetched for the reader
    assert "CMT (mid-trained)" in report.read_text()

    (posttrain,) = fs.ls(f"{base}/posttrain")
    fs.rm_file(f"{posttrain}/{MANIFEST}")  # an upload cut before its manifest: the stage is incomplete
    third = _run(root, mirror)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "[posttrain] computed" in third.stdout
    assert all(f"[{stage}] cached" in third.stdout for stage in ("teacher", "rollouts", "midtrain", "evaluation"))
    assert "resuming from step 120 of 120" in third.stderr  # its checkpoint was still in the mirror
    assert remote.remote_manifest(f"s3://{posttrain}")["files"] == manifests["posttrain"]["files"]


def test_an_unreachable_bucket_is_one_line_naming_artifact_root(bucket, tmp_path):
    done = _run("s3://no-such-bucket/runs", tmp_path / "mirror")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("invalid input: artifact_root='s3://no-such-bucket/runs' "
                                                   "cannot be reached"), lines
    assert not (tmp_path / "mirror").exists()


@pytest.mark.slow
def test_the_loader_benchmark_writes_every_field(tmp_path):
    out = tmp_path / "object_storage.json"
    done = subprocess.run([sys.executable, "benchmarks/object_storage.py", "--quick", "--repeats", "1", "--out",
                           str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["target_ratio"] == 0.75 and result["versions"]["s3fs"] and result["versions"]["waitress"]
    placements = ["shared_cores"] + (["split_cores"] if len(os.sched_getaffinity(0)) > 1 else [])
    for placement in placements:
        layout = result[placement]["layouts"]["digits"]
        for figure in ("cold", "cold_ranges", "warm", "training"):
            assert layout["ratio"][figure] > 0
        assert layout["cold_pairs_per_s"]["local"] > 0 and layout["training_steps_per_s"]["s3"] > 0
        assert layout["request_ms"] > 0 and layout["chunk_bytes"] > 0
    if "split_cores" in placements:  # the server on its own CPU, this process on the others
        split = result["split_cores"]
        assert set(split["server_cpus"]).isdisjoint(split["client_cpus"])


def test_the_loader_benchmark_names_a_bad_flag_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/object_storage.py", "--epochs", "1", "--out",
                           str(tmp_path / "o.json")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith("error: --epochs must be at least 2, got 1")
    assert not (tmp_path / "o.json").exists()
