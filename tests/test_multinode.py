"""Multi-node training, for real on loopback: two ``torchrun`` agents (``cmt launch midtrain``, 2 nodes x 1 process,
gloo) meet at a c10d rendezvous on 127.0.0.1 and train the same artifact one process trains alone; a node killed
mid-run and a relaunch of both agents resume from the last checkpoint."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from cmt_core.pipeline import run_pipeline
from cmt_core.presets import get_preset
from cmt_core.stages import plan
from tests.servers import free_port

pytestmark = pytest.mark.slow

SMALL = ["teacher.train.steps=100", "rollout.num_trajectories=512", "midtrain.train.steps=160",
         "midtrain.train.checkpoint_every=20", "midtrain.train.log_every=20", "midtrain.train.eval_every=null",
         "midtrain.train.batch_size=128", "cpu_threads=1"]
TOLERANCE = 1e-5  # two ranks reduce the gradient in another order than one process: float32 rounding only


def cli(root: Path, command: str, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "cmt_core.cli", command, "midtrain", "--preset", "toy", "--artifact-root", str(root)]
    for override in [*SMALL, *extra]:
        args += ["--set", override]
    return args


def two_nodes(port: int, run_id: str) -> list[str]:
    return ["launch.nodes=2", "launch.procs_per_node=1", f"launch.rdzv_endpoint=127.0.0.1:{port}",
            f"launch.rdzv_id={run_id}"]


def start_agents(root: Path, run_id: str, logs: Path) -> list[subprocess.Popen]:
    port = free_port()
    return [subprocess.Popen(cli(root, "launch", *two_nodes(port, run_id)), stdout=(logs / f"agent{k}.log").open("a"),
                             stderr=subprocess.STDOUT, start_new_session=True) for k in range(2)]


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL an agent and every process under it (torchrun starts its workers in sessions of their own)."""
    try:
        tree = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            kill_node(proc)


def weights(root: Path) -> dict:
    cfg = get_preset("toy", SMALL, artifact_root=root)
    return torch.load(plan(cfg).path("midtrain") / "model.pt", weights_only=True)["state_dict"]


def max_difference(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Teacher and rollouts, complete; each test copies them."""
    root = tmp_path_factory.mktemp("inputs")
    run_pipeline(get_preset("toy", SMALL, artifact_root=root), targets=["rollouts"])
    return root


@pytest.fixture(scope="module")
def single(inputs, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("single") / "root"
    shutil.copytree(inputs, root)
    done = subprocess.run(cli(root, "stage"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return weights(root)


def test_two_nodes_give_the_weights_of_one_process(inputs, single, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(inputs, root)
    procs = start_agents(root, "same-weights", tmp_path)
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        stop(procs)
    logs = "".join(p.read_text() for p in tmp_path.glob("agent*.log"))
    assert codes == [0, 0], logs[-4000:]
    assert "ranks: 2" in "".join(p.read_text() for p in (root / "logs").glob("*stage-rank0.log"))
    difference = max_difference(weights(root), single)
    print(f"two nodes vs one process, max |weight difference|: {difference:.3g}")
    assert difference < TOLERANCE


def test_a_killed_node_and_a_relaunch_resume_from_the_last_checkpoint(inputs, single, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(inputs, root)
    checkpoint = plan(get_preset("toy", SMALL, artifact_root=root)).path("midtrain") / "train" / "checkpoint.pt"
    procs = start_agents(root, "killed", tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not checkpoint.exists():
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.05)
        kill_node(procs[1])  # the second node dies: its agent and its worker
        assert procs[0].wait(timeout=300) != 0  # the survivor's job fails, nothing is marked complete
    finally:
        stop(procs)
    assert not (checkpoint.parent.parent / "manifest.json").exists()

    procs = start_agents(root, "relaunched", tmp_path)
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        stop(procs)
    logs = "".join(p.read_text() for p in (root / "logs").glob("*.log"))
    assert codes == [0, 0], "".join(p.read_text() for p in tmp_path.glob("agent*.log"))[-4000:]
    resumed = [int(step) for step in re.findall(r"resuming from step (\d+) of", logs)]
    assert resumed and resumed[-1] >= 20, logs[-3000:]
    assert max_difference(weights(root), single) < TOLERANCE
