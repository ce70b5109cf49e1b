import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cmt_core.config import ClusterConfig, RolloutConfig, SolverConfig, StoreConfig
from cmt_core.data.synthetic import GaussianMixture
from cmt_core.trajectories.dask_rollouts import run_rollouts
from cmt_core.trajectories.rollout import rollout_batch
from cmt_core.trajectories.store import missing_shards, open_store
from tests.servers import free_port

NUM, SHAPE, TEACHER = 60, (2,), "gmm-exact"
CFG = RolloutConfig(solver=SolverConfig(name="dpm2m", steps=8), batch_size=8, seed=3,
                    store=StoreConfig(chunk_trajectories=4, shard_chunks=2), cluster=ClusterConfig(workers=1))
NUM_SHARDS = 8  # 60 trajectories in shards of 8, the last one of 4


# Teacher factories: module level, so that the dask workers can import them.
def gmm_teacher():
    return GaussianMixture().denoise


def slow_gmm_teacher(delay: float):
    gmm = GaussianMixture()

    def denoise(x, t, cond=None):
        time.sleep(delay)
        return gmm.denoise(x, t, cond)
    return denoise


def worker_killing_gmm_teacher(flag: str):
    """The first worker process that uses this teacher dies (once): its shard must be retried."""
    if not os.path.exists(flag):
        Path(flag).touch()
        os._exit(1)
    return GaussianMixture().denoise


def with_workers(n: int) -> RolloutConfig:
    return CFG.model_copy(update={"cluster": ClusterConfig(workers=n)})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted store, from one worker."""
    return open_store(run_rollouts(gmm_teacher, tmp_path_factory.mktemp("ref") / "store", NUM, SHAPE, CFG, TEACHER))


def assert_same_store(path, reference):
    store = open_store(path)
    assert np.array_equal(store.states[:], reference.states[:])  # bit-identical storage
    assert torch.equal(store.grid, reference.grid) and torch.equal(store.seeds, reference.seeds)


def test_store_holds_the_solver_trajectories(reference):
    start, stop = reference.shard_range(7)
    expected = rollout_batch(gmm_teacher(), CFG.seed, range(start, stop), SHAPE, CFG.solver)
    assert torch.equal(reference.read(range(start, stop)), expected)
    assert reference.attrs["teacher_id"] == TEACHER
    assert reference.attrs["rollout_runs"][-1]["shards_computed"] == NUM_SHARDS


def test_one_and_two_workers_give_bit_identical_stores(tmp_path, reference):
    path = run_rollouts(gmm_teacher, tmp_path / "store", NUM, SHAPE, with_workers(2), TEACHER)
    assert_same_store(path, reference)


def test_complete_store_returns_at_once(reference):
    before = reference.attrs["rollout_runs"]
    run_rollouts(gmm_teacher, reference.path, NUM, SHAPE, CFG, TEACHER)
    assert open_store(reference.path).attrs["rollout_runs"] == before


def test_a_different_rollout_refuses_to_resume_the_store(reference):
    with pytest.raises(ValueError, match="seed"):
        run_rollouts(gmm_teacher, reference.path, NUM, SHAPE, CFG.model_copy(update={"seed": 4}), TEACHER)


@pytest.mark.slow
def test_killed_rollout_resumes_missing_shards_only(tmp_path, reference):
    path = tmp_path / "store"
    script = (
        "import functools\n"
        "from cmt_core.trajectories.dask_rollouts import run_rollouts\n"
        "from test_dask_rollouts import CFG, NUM, SHAPE, TEACHER, slow_gmm_teacher\n"
        f"run_rollouts(functools.partial(slow_gmm_teacher, 0.1), {str(path)!r}, NUM, SHAPE, CFG, TEACHER)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1])])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not ((path / "zarr.json").exists() and len(missing_shards(path)) <= NUM_SHARDS - 2):
            assert proc.poll() is None, f"rollout process ended early: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no shard was written in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its scheduler and its worker processes
        proc.wait()
    missing = missing_shards(path)
    assert 0 < len(missing) <= NUM_SHARDS - 2
    assert not open_store(path, partial=True).complete

    run_rollouts(gmm_teacher, path, NUM, SHAPE, CFG, TEACHER)
    runs = open_store(path).attrs["rollout_runs"]
    assert [r["shards_computed"] for r in runs] == [len(missing)]  # the killed run never finished
    assert_same_store(path, reference)


def test_shard_of_a_dying_worker_is_retried(tmp_path, reference):
    factory = functools.partial(worker_killing_gmm_teacher, str(tmp_path / "died"))
    path = run_rollouts(factory, tmp_path / "store", NUM, SHAPE, CFG, TEACHER)
    assert (tmp_path / "died").exists()
    assert_same_store(path, reference)


@pytest.mark.slow
def test_cluster_started_with_the_dask_commands_gives_the_localcluster_store(tmp_path, reference):
    """A cluster that is not ours: ``dask scheduler`` and ``dask worker`` as separate processes on loopback (as on
    a real cluster); the rollouts reach it by address and write the same bits as a LocalCluster."""
    dask = str(Path(sys.executable).parent / "dask")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1])])}
    log = (tmp_path / "dask.log").open("w")
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)]
    try:
        procs.append(subprocess.Popen([dask, "worker", address, "--nworkers", "2", "--nthreads", "1",
                                       "--no-dashboard", "--host", "127.0.0.1"],
                                      env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        cfg = CFG.model_copy(update={"cluster": ClusterConfig(address=address)})
        path = run_rollouts(gmm_teacher, tmp_path / "store", NUM, SHAPE, cfg, TEACHER)
        assert open_store(path).attrs["rollout_runs"][-1]["cluster"] == address
        assert_same_store(path, reference)
    finally:
        for proc in procs:  # every server a test starts is stopped, also on failure
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
