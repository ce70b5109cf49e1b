"""The scheduled evaluation (``cmt_core.watch``, the ``cmt-watch`` flow) of a toy mid-training that is still running
in another process: it scores the latest checkpoint, says the stage is running, then stopped once it is killed."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cmt_core.checkpoint import CHECKPOINT_FILE
from cmt_core.engine import compute_stage
from cmt_core.presets import resolve_config
from cmt_core.runtime import Runtime
from cmt_core.stages import plan
from cmt_core.watch import watch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
LONG = ["cpu_threads=1", "teacher.train.steps=60", "rollout.num_trajectories=256", "midtrain.train.steps=1000000",
        "midtrain.train.checkpoint_every=20", "midtrain.train.log_every=20", "eval.num_samples=300"]


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """A toy run whose teacher and rollouts are complete and whose mid-training runs in a subprocess."""
    root = tmp_path_factory.mktemp("watched")
    resolved = plan(resolve_config("toy", LONG, None, str(root)))
    for stage in ("teacher", "rollouts"):
        compute_stage(resolved, stage, Runtime.detect("cpu"))
    command = [sys.executable, "-m", "cmt_core.cli", "stage", "midtrain", "--preset", "toy", "--artifact-root",
               str(root), *(a for s in LONG for a in ("--set", s))]
    process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    checkpoint = resolved.path("midtrain") / "train" / CHECKPOINT_FILE
    deadline = time.time() + 180
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    try:
        assert checkpoint.exists(), "the mid-training never wrote a checkpoint"
        yield resolved, process
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def _rows(resolved) -> dict[str, dict]:
    return {row["stage"]: row for row in watch(resolved, Runtime.detect("cpu"))}


def test_a_running_stage_is_scored_from_its_latest_checkpoint(running):
    resolved, process = running
    rows = _rows(resolved)
    midtrain = rows["midtrain"]
    assert midtrain["state"] == "running" and midtrain["steps"] == 1000000
    assert midtrain["scored"].startswith("checkpoint ") and int(midtrain["scored"].split()[1]) >= 20
    for metric in ("flow_map_error_1step", "sliced_wasserstein_1step", "sliced_wasserstein_2step"):
        assert math.isfinite(midtrain[metric]), metric
    assert rows["teacher"]["state"] == "finished" and rows["teacher"]["scored"] == "kept model"
    assert math.isfinite(rows["teacher"]["sliced_wasserstein_teacher"])
    assert rows["posttrain"]["state"] == "not started" and "scored" not in rows["posttrain"]
    assert process.poll() is None  # reading the run did not disturb it


def test_the_watch_flow_posts_the_metrics_and_a_killed_run_reads_as_stopped(running):
    from prefect.testing.utilities import prefect_test_harness

    from flows.watch import cmt_watch

    resolved, process = running
    with prefect_test_harness(server_startup_timeout=120):
        rows = cmt_watch(preset="toy", overrides=tuple(LONG), artifact_root=str(resolved.cfg.artifact_root))
    assert [r["stage"] for r in rows] == ["teacher", "midtrain", "posttrain"]
    assert rows[1]["state"] == "running" and math.isfinite(rows[1]["flow_map_error_1step"])
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert _rows(resolved)["midtrain"]["state"] == "stopped"


def test_a_damaged_manifest_is_named_in_its_row_and_the_other_stages_are_still_read(running, tmp_path, capsys):
    import shutil

    from cmt_core.artifacts import MANIFEST
    from cmt_core.cli import main

    resolved, _ = running
    root = tmp_path / "copy"
    shutil.copytree(resolved.cfg.artifact_root, root, ignore=shutil.ignore_patterns("midtrain", "*.lock"))
    (next((root / "teacher").iterdir()) / MANIFEST).write_text("[1, 2]")
    assert main(["watch", "--preset", "toy", "--artifact-root", str(root), *(a for s in LONG for a in ("--set", s))]) \
        == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("teacher    damaged") and "manifest" in out[0]
    assert out[1].startswith("midtrain   not started") and out[2].startswith("posttrain  not started")
