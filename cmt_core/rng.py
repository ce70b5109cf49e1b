"""Every random number of the pipeline comes from a named stream of this module.

``generator(stream, seed, *keys)`` is a CPU ``torch.Generator`` whose state is a function of the stream's
name, the config's seed and integer keys (step, epoch, trajectory, rank, ...). Distinct
``(stream, seed, keys)`` tuples give independent generators: the tuple (with its length) is mixed by
numpy's ``SeedSequence``, which never maps two different tuples to one state the way a linear formula
(``seed * P + step``) does.

Streams, and the keys each one takes:

=================  ===============================  =====================================================
stream             keys                             draws
=================  ===============================  =====================================================
SYNTHETIC_DATA     step                             a step's fresh samples of a 2-D distribution
EPOCH_ORDER        epoch                            the permutation of an in-memory data set's epoch (also
                                                    the shuffle and dropout of a latent VGG16's epoch)
OBJECTIVE          step                             an objective's noise and times (``StepRandom``)
STEP_TORCH         step, rank                       the torch global seed of a step (dropout masks)
PAIR_TARGET        step                             CMT target indices j of a step
TRAJECTORY_NOISE   trajectory                       x_T of one teacher trajectory
STORE_ORDER        epoch [, buffer + 1]             chunk order and in-buffer shuffle of the store loader
TRAJECTORY_LABEL   trajectory                       the class label of one conditional teacher trajectory
LABEL_DROPOUT      step                             which rows of a training batch lose their class label
SAMPLE_BLOCK       block                            the noises and labels of images 1000 b .. 1000 b + 999
                                                    drawn by ``cmt sample`` (``cmt_core.generator``)
LATENT_DRAW        step                             a step's posterior draws of an encoded data set's latents
=================  ===============================  =====================================================
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class Stream(IntEnum):
    SYNTHETIC_DATA = 0
    EPOCH_ORDER = 1
    OBJECTIVE = 2
    STEP_TORCH = 3
    PAIR_TARGET = 4
    TRAJECTORY_NOISE = 5
    STORE_ORDER = 6
    TRAJECTORY_LABEL = 7
    LABEL_DROPOUT = 8
    SAMPLE_BLOCK = 9
    LATENT_DRAW = 10


def seed_of(stream: Stream, seed: int, *keys: int) -> int:
    """A 63-bit seed determined by ``(stream, seed, *keys)`` (non-negative integers)."""
    words = [int(stream), len(keys), int(seed), *(int(k) for k in keys)]
    if min(words) < 0:
        raise ValueError(f"seeds and keys must be non-negative, got {words}")
    # SeedSequence ignores trailing zero words: the key count keeps (5,) and (5, 0) apart
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0]) & (2**63 - 1)


def generator(stream: Stream, seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded by ``seed_of(stream, seed, *keys)``."""
    return torch.Generator().manual_seed(seed_of(stream, seed, *keys))
