import numpy as np
import pytest
import torch

from cmt_core.cli import main as cli_main
from cmt_core.config import SolverConfig, StoreConfig
from cmt_core.data.synthetic import GaussianMixture
from cmt_core.trajectories.layout import sizing
from cmt_core.trajectories.rollout import rollout, trajectory_seed
from cmt_core.trajectories.store import (
    BFLOAT16_BITS,
    CorruptChunkError,
    IncompleteStoreError,
    create_store,
    mark_complete,
    missing_shards,
    open_store,
    reset_shards,
    write_shard,
)
from cmt_core.trajectories.verify import verify_store

SOLVER = SolverConfig(name="dpm2m", steps=6)
NUM, SEED = 22, 5


@pytest.fixture(scope="module")
def trajectories():
    return rollout(GaussianMixture().denoise, NUM, (2,), SOLVER, seed=SEED, batch_size=8, progress=False)


def write_store(path, traj, cfg, shards=None):
    store = create_store(path, NUM, (2,), traj.grid, cfg, {"teacher_id": "gmm-exact", "seed": SEED,
                                                           "solver": SOLVER.model_dump(mode="json")},
                         seeds=traj.seeds)
    for k in range(store.num_shards) if shards is None else shards:
        start, stop = store.shard_range(k)
        write_shard(store, k, traj.states[start:stop])
    if shards is None:
        mark_complete(path)
    return path


@pytest.mark.parametrize("codec", ["zstd", "blosc", "none"])
def test_float32_round_trip_is_exact(tmp_path, trajectories, codec):
    cfg = StoreConfig(codec=codec, chunk_trajectories=3, shard_chunks=2)
    store = open_store(write_store(tmp_path / "s", trajectories, cfg))
    assert len(store) == NUM and store.num_shards == 4 and store.num_chunks == 8
    assert torch.equal(store.read(range(NUM)), trajectories.states)
    assert torch.equal(store.read([21, 0, 7]), trajectories.states[[21, 0, 7]])
    assert store.grid.dtype == torch.float64 and torch.equal(store.grid, trajectories.grid)
    assert store.seeds.tolist() == [trajectory_seed(SEED, k) for k in range(NUM)]
    assert store.attrs["teacher_id"] == "gmm-exact" and store.attrs["solver"]["steps"] == 6
    assert store.attrs["complete"] and store.attrs["codec"] == codec and store.attrs["versions"]["zarr"]
    assert store.states.shape == (NUM, 7, 2) and store.states.chunks == (3, 7, 2)


@pytest.mark.parametrize("dtype,rtol", [("float16", 1e-3), ("bfloat16", 8e-3)])
def test_half_precision_round_trip_within_tolerance(tmp_path, trajectories, dtype, rtol):
    store = open_store(write_store(tmp_path / "s", trajectories, StoreConfig(dtype=dtype, chunk_trajectories=4)))
    values = store.read(range(NUM))
    assert values.dtype == torch.float32
    assert torch.equal(values, trajectories.states.to(getattr(torch, dtype)).float())  # exactly the cast
    torch.testing.assert_close(values, trajectories.states, rtol=rtol, atol=1e-3)
    if dtype == "bfloat16":
        assert store.states.dtype == np.uint16 and store.attrs["states_encoding"] == BFLOAT16_BITS


def test_keep_indices_store_a_subset_of_the_states(tmp_path, trajectories):
    cfg = StoreConfig(keep_indices=(0, 2, 4, 6), chunk_trajectories=4)
    store = open_store(write_store(tmp_path / "s", trajectories, cfg))
    assert torch.equal(store.read(range(NUM)), trajectories.states[:, [0, 2, 4, 6]])
    assert torch.equal(store.grid, trajectories.grid[[0, 2, 4, 6]])


def test_incomplete_store_is_never_read_as_complete(tmp_path, trajectories):
    cfg = StoreConfig(chunk_trajectories=3, shard_chunks=2)
    path = write_store(tmp_path / "s", trajectories, cfg, shards=[0, 2])
    with pytest.raises(IncompleteStoreError, match="2 of 4 shards"):
        open_store(path)
    assert missing_shards(path) == [1, 3]
    with pytest.raises(IncompleteStoreError):
        mark_complete(path)
    assert not verify_store(path).ok and verify_store(path).missing_shards == [1, 3]
    partial = open_store(path, partial=True)
    assert torch.equal(partial.read(range(6)), trajectories.states[:6])
    for k in (1, 3):
        start, stop = partial.shard_range(k)
        write_shard(partial, k, trajectories.states[start:stop])
    mark_complete(path)
    assert open_store(path).complete and verify_store(path).ok


def test_corrupted_chunk_is_named_by_verify_and_raises_on_read(tmp_path, trajectories, capsys):
    path = write_store(tmp_path / "s", trajectories, StoreConfig(chunk_trajectories=3, shard_chunks=2))
    assert cli_main(["store", "verify", str(path)]) == 0
    shard_file = path / "states" / "c" / "1" / "0" / "0"  # shard 1 = chunks 2 and 3; chunk 2 comes first
    data = bytearray(shard_file.read_bytes())
    data[8:16] = bytes(b ^ 0xFF for b in data[8:16])
    shard_file.write_bytes(bytes(data))

    report = verify_store(path)
    assert not report.ok and [b["chunk"] for b in report.bad_chunks] == [2] and report.bad_shards == [1]
    assert cli_main(["store", "verify", str(path)]) == 1
    assert "bad chunk 2 (shard 1)" in capsys.readouterr().out
    store = open_store(path)
    with pytest.raises(CorruptChunkError, match="chunk 2"):
        store.read([7])
    assert torch.equal(store.read([9, 0]), trajectories.states[[9, 0]])  # the other chunks are fine

    reset_shards(path, report.bad_shards)  # a rollout rerun would now rewrite shard 1
    assert missing_shards(path) == [1]
    with pytest.raises(IncompleteStoreError):
        open_store(path)


def test_sizing_of_the_paper_runs():
    assert sizing((3, 32, 32), 17, 1)["bytes_per_trajectory"] == 17 * 3072 * 4
    assert sizing((3, 32, 32), 17, 2_400_000)["total_bytes"] == 2_400_000 * 208_896
    assert sizing((3, 32, 32), 17, 1, "bfloat16", range(0, 17, 2))["bytes_per_trajectory"] == 9 * 3072 * 2
    assert sizing((4, 64, 64), 17, 1_280_000, "float16")["total_bytes"] == 1_280_000 * 17 * 16384 * 2
