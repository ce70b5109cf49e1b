from itertools import product

import pytest

from cmt_core.rng import Stream, generator, seed_of


def test_named_streams_never_share_a_seed():
    seeds = [seed_of(stream, seed, step, rank) for stream, seed, step, rank
             in product(Stream, range(3), range(300), range(4))]
    assert len(set(seeds)) == len(seeds)


def test_the_collisions_of_linear_seed_mixing_are_gone():
    # seed * 1_000_003 + k made trajectory 1_000_003 of seed 0 trajectory 0 of seed 1
    assert seed_of(Stream.TRAJECTORY_NOISE, 0, 1_000_003) != seed_of(Stream.TRAJECTORY_NOISE, 1, 0)
    # stream = 3 + rank made rank 1's step seed the stream of the CMT target indices
    assert seed_of(Stream.STEP_TORCH, 0, 5, 1) != seed_of(Stream.PAIR_TARGET, 0, 5)
    assert seed_of(Stream.OBJECTIVE, 0, 5) != seed_of(Stream.OBJECTIVE, 0, 5, 0)  # keys are not zero-padded


def test_a_stream_is_a_pure_function_of_its_keys():
    a, b = generator(Stream.OBJECTIVE, 7, 11), generator(Stream.OBJECTIVE, 7, 11)
    assert a.initial_seed() == b.initial_seed() < 2**63


def test_negative_keys_are_refused():
    with pytest.raises(ValueError, match="non-negative"):
        seed_of(Stream.OBJECTIVE, 0, -1)
