"""Trains a few steps of the CMT or Mean Flow objective; run alone or under torchrun (gloo).

usage: python tests/ddp_worker.py {cmt,meanflow} OUT_FILE
Rank 0 writes the final weights to OUT_FILE.
"""

import sys
import tempfile
from pathlib import Path

import torch

from cmt_core.config import NetworkConfig, SolverConfig, TrainConfig
from cmt_core.data.sources import SyntheticSource
from cmt_core.data.synthetic import GaussianMixture
from cmt_core.models import build_model
from cmt_core.objectives.cmt import CMTLoss
from cmt_core.objectives.meanflow import MeanFlowLoss
from cmt_core.runtime import Runtime
from cmt_core.teachers import ExactDenoiser
from cmt_core.training import train
from cmt_core.trajectories.pairs import TrajectoryPairs
from cmt_core.trajectories.rollout import rollout

SMALL_MLP = NetworkConfig(width=32, depth=2, emb_dim=16).model_dump()


def main(kind: str, out: str) -> None:
    torch.set_num_threads(1)
    runtime = Runtime.detect("cpu")
    gmm = GaussianMixture()
    torch.manual_seed(0)
    cfg = TrainConfig(steps=6, batch_size=32, lr=1e-2, ema_decay=0.9, checkpoint_every=100, log_every=2)
    if kind == "cmt":
        model = build_model("consistency", SMALL_MLP, (2,), sigma_min=0.002)
        traj = rollout(ExactDenoiser(gmm), 64, (2,), SolverConfig(steps=4), progress=False)
        source, loss = TrajectoryPairs(traj.states, traj.grid), CMTLoss("cm")
    else:
        model = build_model("flow_map", SMALL_MLP, (2,))
        source, loss = SyntheticSource(gmm), MeanFlowLoss(equal_fraction=0.25)
    with tempfile.TemporaryDirectory() as tmp:
        train(model, loss, source, cfg, Path(tmp), runtime, desc=kind)
    if runtime.is_main:
        torch.save(model.state_dict(), out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
