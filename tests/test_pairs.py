from collections import Counter

import pytest
import torch

from cmt_core.config import SolverConfig, StoreConfig
from cmt_core.data.synthetic import GaussianMixture
from cmt_core.trajectories.pairs import StorePairs, TrajectoryPairs
from cmt_core.trajectories.rollout import rollout
from cmt_core.trajectories.store import IncompleteStoreError, create_store, mark_complete, write_shard

NUM, STEPS = 30, 4  # 30 trajectories of 5 states: 120 pairs per epoch in 8 chunks (the last one of 2)


@pytest.fixture(scope="module")
def trajectories():
    return rollout(GaussianMixture().denoise, NUM, (2,), SolverConfig(steps=STEPS), seed=1, progress=False)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, trajectories):
    path = tmp_path_factory.mktemp("loader") / "store"
    store = create_store(path, NUM, (2,), trajectories.grid, StoreConfig(chunk_trajectories=4, shard_chunks=2),
                         {"seed": 1})
    for k in range(store.num_shards):
        write_shard(store, k, trajectories.states[slice(*store.shard_range(k))])
    mark_complete(path)
    return path


def epoch_points(pairs, steps, batch_size):
    return Counter((t, i) for s in range(steps) for t, i in
                   zip(*(pairs.pair_indices(s, batch_size)[k].tolist() for k in ("traj", "i"))))


@pytest.mark.parametrize("to_end", [True, False])
def test_batches_hold_the_stored_pairs_like_trajectory_pairs(store_path, trajectories, to_end):
    pairs = StorePairs(store_path, to_end=to_end, seed=0)
    memory = TrajectoryPairs(trajectories.states, trajectories.grid, to_end)
    batch, reference = pairs.batch(3, 16), memory.batch(3, 16)
    assert batch.keys() == reference.keys()
    assert batch["cond"] == reference["cond"] == {}  # an unconditional store
    assert all(batch[k].dtype == reference[k].dtype == torch.float32 and batch[k].shape == reference[k].shape
               for k in batch if k != "cond")
    idx = pairs.pair_indices(3, 16)
    traj, i, j = idx["traj"], idx["i"], idx["j"]
    assert torch.equal(batch["x_t"], trajectories.states[traj, i])
    assert torch.equal(batch["x_s"], trajectories.states[traj, j])
    assert torch.equal(batch["t"], trajectories.grid[i].float())
    assert torch.equal(batch["s"], trajectories.grid[j].float())
    assert (j == STEPS).all() if to_end else ((j > i) & (j <= STEPS)).all() and len(j.unique()) > 1


def test_every_pair_of_an_epoch_appears_once_across_two_ranks(store_path, trajectories):
    pairs = StorePairs(store_path, seed=7, buffer_chunks=2)
    key = {tuple(trajectories.states[n, i].tolist()) + (float(trajectories.grid[i].float()),): (n, i)
           for n in range(NUM) for i in range(STEPS)}
    seen = Counter()
    for step in range(10):  # 10 steps of 12 pairs = one epoch
        for rank in (0, 1):
            b = pairs.batch(step, 12, rank=rank, world=2)
            assert len(b["x_t"]) == 6
            seen.update(key[tuple(x.tolist()) + (float(t),)] for x, t in zip(b["x_t"], b["t"]))
    assert seen == Counter(key.values())  # each of the 120 pairs exactly once


def test_epochs_span_batches_and_reshuffle(store_path):
    pairs = StorePairs(store_path, seed=7)
    assert set(epoch_points(pairs, 15, 16).values()) == {2}  # 240 positions = 2 epochs, a batch straddles them
    first = [pairs.pair_indices(s, 12)["traj"] for s in range(10)]
    second = [pairs.pair_indices(s, 12)["traj"] for s in range(10, 20)]
    assert not torch.equal(torch.cat(first), torch.cat(second))


def test_a_buffer_of_chunks_is_consumed_before_the_next(store_path):
    pairs = StorePairs(store_path, seed=3, buffer_chunks=2)
    chunks = torch.cat([pairs.pair_indices(s, 1)["chunk"] for s in range(120)]).tolist()  # one epoch
    by_first_use = sorted(set(chunks), key=chunks.index)
    assert by_first_use != list(range(8))  # the chunk order is shuffled
    covered = []
    for k in range(0, 8, 2):  # buffer k // 2: its two chunks fill one contiguous run of positions
        positions = [p for p, c in enumerate(chunks) if c in by_first_use[k:k + 2]]
        assert positions == list(range(positions[0], positions[-1] + 1))
        covered += positions
        run = [chunks[p] for p in positions]
        assert sum(a != b for a, b in zip(run, run[1:])) > 2  # the points of the buffer's chunks are mixed
    assert covered == list(range(120))


def test_resume_mid_epoch_gives_the_same_batches(store_path):
    straight = StorePairs(store_path, to_end=False, seed=2, buffer_chunks=2)
    expected = [straight.batch(s, 16) for s in range(14)]
    resumed = StorePairs(store_path, to_end=False, seed=2, buffer_chunks=2)
    for step in range(9, 14):
        got = resumed.batch(step, 16)
        assert all(torch.equal(got[k], expected[step][k]) for k in got if k != "cond")


def test_ranks_slice_the_single_process_batch(store_path):
    pairs = StorePairs(store_path, seed=0)
    whole = pairs.batch(5, 16)
    parts = [pairs.batch(5, 16, rank=r, world=2) for r in (0, 1)]
    assert all(torch.equal(whole[k], torch.cat([p[k] for p in parts])) for k in whole if k != "cond")


def test_incomplete_store_is_refused(tmp_path, trajectories):
    create_store(tmp_path / "s", NUM, (2,), trajectories.grid, StoreConfig(chunk_trajectories=4), {"seed": 1})
    with pytest.raises(IncompleteStoreError):
        StorePairs(tmp_path / "s")
