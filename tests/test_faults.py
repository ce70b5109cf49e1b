"""Faults cost minutes, never results: each test does the real thing to a real ``cmt run --preset toy`` (a
process, its dask cluster, its files) and checks the outcome against an uninterrupted run of the same config,
file by file (weights, checkpoints, store chunks, metrics; only wall-clock timings and provenance differ).

Covered here: two identical runs (byte-identical), SIGKILL in each of the five stages (the rerun recomputes only
what was lost, and the killed call's seconds still count), a truncated checkpoint, a damaged model file of a
complete artifact, a corrupted store chunk (``cmt store verify --repair``), a non-finite loss, a full disk (a
file-size limit on the process), and two identical pipelines at once on one artifact root (one computes, the other
waits and reuses). A dask worker killed mid-shard is in ``test_dask_rollouts.py``; bad input in
``test_bad_inputs.py``.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cmt_core.artifacts import EVENTS_DIR, MANIFEST, SECONDS_LEDGER, read_call_seconds, write_manifest
from cmt_core.engine import CallTimer

pytestmark = pytest.mark.slow

SMALL = ["teacher.train.steps=200", "teacher.train.checkpoint_every=40", "teacher.train.log_every=20",
         "rollout.num_trajectories=2048", "rollout.store.chunk_trajectories=16", "rollout.store.shard_chunks=2",
         "midtrain.train.steps=200", "midtrain.train.checkpoint_every=40", "midtrain.train.log_every=20",
         "midtrain.train.eval_every=100",
         "posttrain.train.steps=160", "posttrain.train.checkpoint_every=40", "posttrain.train.log_every=20",
         "posttrain.train.eval_every=80", "eval.num_samples=400", "cpu_threads=1"]
# values that are wall-clock times or provenance, not results
TIMING_KEYS = {"seconds", "seconds_by_call", "eval_seconds", "resumed_from", "written_at", "created", "completed",
               "finished", "rollout_runs", "host", "files"}


def command(root: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "cmt_core.cli", "run", "--preset", "toy", "--artifact-root", str(root)]
    for override in [*SMALL, *extra]:
        args += ["--set", override]
    return args


def run(root: Path, *extra: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command(root, *extra), capture_output=True, text=True, timeout=600, **kwargs)


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def contents(root: Path) -> dict[str, object]:
    """Every result file under ``root``: bytes, or for JSON the values without timings (reports and plots,
    which print timings, the run logs, TensorBoard event files and damaged checkpoints set aside as ``*.corrupt`` are
    left out)."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("logs/") or EVENTS_DIR in rel.split("/") or path.suffix in (".lock", ".md", ".png",
                                                                                     ".corrupt"):
            continue
        if path.suffix == ".json":
            out[rel] = _without_timings(json.loads(path.read_text()))
        elif path.suffix == ".jsonl":
            out[rel] = [_without_timings(json.loads(line)) for line in path.read_text().splitlines()]
        else:
            out[rel] = path.read_bytes()
    return out


def assert_same(root: Path, reference: dict) -> None:
    got = contents(root)
    assert sorted(got) == sorted(reference), set(got) ^ set(reference)
    different = [rel for rel in reference if got[rel] != reference[rel]]
    assert not different, f"files that differ from the uninterrupted run: {different}"


def stage_lines(stdout: str) -> dict[str, str]:
    """``{stage: 'cached' | 'computed'}`` from the run's printed summary."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^\[(\w+)\] (cached|computed)", stdout, re.M)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("reference")
    done = run(root)
    assert done.returncode == 0, done.stderr
    return root, contents(root)


def copy_of(reference, tmp_path: Path) -> Path:
    """A copy of the uninterrupted run's artifact root to damage."""
    root = tmp_path / "root"
    shutil.copytree(reference[0], root)
    return root


def test_two_identical_runs_are_byte_identical(reference, tmp_path):
    done = run(tmp_path)
    assert done.returncode == 0, done.stderr
    assert_same(tmp_path, reference[1])


def _artifact(root: Path, stage: str) -> Path | None:
    found = sorted(p for p in (root / stage).glob("*") if p.is_dir()) if (root / stage).exists() else []
    return found[0] if found else None


def _killed_in(stage: str, root: Path) -> bool:
    """True once the run is inside ``stage`` with something to lose: a checkpoint written, a shard stored, the
    evaluation folder made."""
    folder = _artifact(root, stage)
    if folder is None or (folder / "manifest.json").exists():
        return False
    if stage == "rollouts":  # a shard's done marker written (its states are written before it)
        markers = folder / "store.zarr" / "shard_done" / "c"
        return markers.exists() and any(p.is_file() for p in markers.rglob("*"))
    if stage == "evaluation":  # its call has begun
        return (folder / SECONDS_LEDGER).exists()
    return (folder / "train" / "checkpoint.pt").exists()


@pytest.mark.parametrize("stage", ["teacher", "rollouts", "midtrain", "posttrain", "evaluation"])
def test_sigkill_in_a_stage_loses_only_the_unsaved_part(stage, reference, tmp_path):
    proc = subprocess.Popen(command(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not _killed_in(stage, tmp_path):
            assert proc.poll() is None and time.monotonic() < deadline, f"the run never reached {stage}"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run, its dask scheduler and workers
        proc.wait()
    folder = _artifact(tmp_path, stage)
    assert not (folder / "manifest.json").exists(), "killed before the stage completed"

    done = run(tmp_path)
    assert done.returncode == 0, done.stderr
    states = stage_lines(done.stdout)
    order = ["teacher", "rollouts", "midtrain", "posttrain", "evaluation"]
    assert all(states[s] == "cached" for s in order[:order.index(stage)]), states  # nothing before it redone
    assert states[stage] == "computed"
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    if stage in ("teacher", "midtrain", "posttrain"):  # resumed from its checkpoint, not from step 0
        resumed = [int(m) for m in re.findall(r"resuming from step (\d+) of", logs)]
        assert resumed and resumed[-1] > 0, logs[-2000:]
    if stage == "rollouts":  # only the missing shards were solved again
        runs = json.loads((folder / "store.zarr" / "zarr.json").read_text())["attributes"]["rollout_runs"]
        assert runs[-1]["shards_computed"] < runs[-1]["shards_total"], runs
    manifest = json.loads((folder / MANIFEST).read_text())  # the killed call's seconds count too
    assert len(manifest["seconds_by_call"]) == 2 and manifest["seconds"] == sum(manifest["seconds_by_call"])
    assert not (folder / SECONDS_LEDGER).exists()
    assert_same(tmp_path, reference[1])


def test_a_killed_call_keeps_its_seconds_up_to_its_last_heartbeat(tmp_path):
    code = ("import os, signal, sys, time\nfrom cmt_core.engine import CallTimer\n"
            "with CallTimer(sys.argv[1], heartbeat=0.05):\n    time.sleep(1.0)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", code, str(tmp_path)], timeout=120)
    assert killed.returncode == -signal.SIGKILL
    (first,) = read_call_seconds(tmp_path)
    assert 0.5 < first <= 1.5, first  # its last heartbeat, not its start
    with CallTimer(tmp_path, heartbeat=0.05) as timer:
        time.sleep(0.2)
    calls = timer.calls()
    assert calls[0] == first and calls[1] >= 0.2 and read_call_seconds(tmp_path) == calls
    manifest = write_manifest(tmp_path, "teacher", "abc", {}, {}, {}, calls)
    assert manifest["seconds"] == sum(calls) and not (tmp_path / SECONDS_LEDGER).exists()
    (tmp_path / SECONDS_LEDGER).write_text('{"seconds_by_call": [1.0, "soon"]}')  # damaged: the figure only
    assert read_call_seconds(tmp_path) == []


def test_truncated_checkpoint_falls_back_to_the_previous_one(reference, tmp_path):
    root = copy_of(reference, tmp_path)
    folder = _artifact(root, "midtrain")
    (folder / "manifest.json").unlink()  # as if the run had died inside mid-training
    checkpoint = folder / "train" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # a torn write of the newest checkpoint

    done = run(root)
    assert done.returncode == 0, done.stderr
    logs = "".join(p.read_text() for p in (root / "logs").glob("*.log"))
    assert f"{checkpoint} is unreadable" in logs and "instead of the damaged" in logs
    assert (checkpoint.parent / "checkpoint.pt.corrupt").exists()
    assert stage_lines(done.stdout)["midtrain"] == "computed"
    assert_same(root, reference[1])


def test_damaged_model_file_of_a_complete_artifact_is_recomputed_not_reused(reference, tmp_path):
    root = copy_of(reference, tmp_path)
    model = _artifact(root, "teacher") / "model.pt"
    model.write_bytes(model.read_bytes()[:-10])

    done = run(root)
    assert done.returncode == 0, done.stderr
    assert stage_lines(done.stdout)["teacher"] == "computed"  # its later stages' ids are the same: reused
    assert stage_lines(done.stdout)["rollouts"] == "cached"
    assert_same(root, reference[1])


def test_corrupted_chunk_is_repaired_from_its_seeds(reference, tmp_path):
    root = copy_of(reference, tmp_path)
    store = _artifact(root, "rollouts") / "store.zarr"
    shard = sorted(p for p in (store / "states" / "c").rglob("*") if p.is_file())[3]
    data = bytearray(shard.read_bytes())
    data[40:48] = bytes(b ^ 0xFF for b in data[40:48])
    shard.write_bytes(bytes(data))

    cli = [sys.executable, "-m", "cmt_core.cli", "store", "verify", str(store)]
    found = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert found.returncode == 1 and "bad chunk" in found.stdout
    repaired = subprocess.run([*cli, "--repair"], capture_output=True, text=True, timeout=300)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "recomputed 1 shards" in repaired.stdout and ": OK" in repaired.stdout
    assert_same(root, reference[1])
    again = run(root)
    assert again.returncode == 0 and set(stage_lines(again.stdout).values()) == {"cached"}


def test_non_finite_loss_stops_the_stage_and_marks_nothing_complete(tmp_path):
    images = np.random.default_rng(0).random((64, 8, 8, 1)).astype(np.float32)
    images[5, 3, 3, 0] = np.nan
    np.savez(tmp_path / "nan.npz", images=images)
    args = [sys.executable, "-m", "cmt_core.cli", "run", "--preset", "digits", "--artifact-root",
            str(tmp_path / "a"), "--set", "data.name=npz", "--set", f"data.path={tmp_path / 'nan.npz'}",
            "--set", "teacher.train.steps=20", "--set", "teacher.train.batch_size=64"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("failed: the teacher stage failed in ") and "non-finite loss" in line, line
    assert not list((tmp_path / "a").rglob("manifest.json"))


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_leaves_nothing_complete_and_a_later_run_succeeds(reference, tmp_path):
    done = run(tmp_path, preexec_fn=_file_size_limit(200_000))  # the teacher's checkpoint does not fit
    assert done.returncode == 1, done.stdout + done.stderr
    assert "failed: the teacher stage failed" in done.stderr and "File too large" in done.stderr, done.stderr
    assert not list(tmp_path.rglob("manifest.json"))
    assert not [p for p in tmp_path.rglob("*.tmp")], "no temporary files left behind"
    again = run(tmp_path)
    assert again.returncode == 0, again.stderr
    assert_same(tmp_path, reference[1])


def test_two_identical_pipelines_at_once_one_computes_the_other_reuses(reference, tmp_path):
    procs = [subprocess.Popen(command(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outputs]
    states = [stage_lines(out) for out, _ in outputs]
    for stage in states[0]:
        assert sorted([states[0][stage], states[1][stage]]) == ["cached", "computed"], states
    assert_same(tmp_path, reference[1])  # one run's rows in every training log, no mixed files
