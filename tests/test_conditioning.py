"""The conditioning channel: conditional exact teachers, conditional rollouts in the store, labelled batches."""

import functools

import pytest
import torch

from cmt_core import conditioning
from cmt_core.config import DataConfig, RolloutConfig, SolverConfig, StoreConfig
from cmt_core.data import load_data
from cmt_core.data.synthetic import GaussianMixture
from cmt_core.models import build_model
from cmt_core.solvers import solve
from cmt_core.teachers import ExactDenoiser
from cmt_core.time_grids import log_uniform_grid
from cmt_core.trajectories.dask_rollouts import run_rollouts
from cmt_core.trajectories.pairs import StorePairs
from cmt_core.trajectories.rollout import initial_noise, trajectory_cond
from cmt_core.trajectories.store import open_store
from cmt_core.trajectories.verify import verify_store

MIXTURE = dict(num_modes=8, radius=2.0, std=0.1)


def class_mixture(gmm: GaussianMixture, c: int) -> GaussianMixture:
    """The mixture of class ``c``'s modes alone: p(x | c) in closed form."""
    sub = GaussianMixture(**MIXTURE)
    sub.means = gmm.means[gmm.mode_class == c]
    return sub


def test_the_conditional_denoiser_is_the_posterior_mean_of_the_class_mixture():
    gmm = GaussianMixture(**MIXTURE, num_classes=3)  # 8 modes dealt to 3 classes: 3, 3 and 2 modes
    x, t = 3 * torch.randn(64, 2, dtype=torch.float64), torch.rand(64, dtype=torch.float64) * 5 + 0.01
    labels = torch.arange(64) % 3
    got = gmm.denoise(x, t, conditioning.class_cond(labels, 3))
    for c in range(3):
        rows = labels == c
        assert torch.allclose(got[rows], class_mixture(gmm, c).denoise(x[rows], t[rows]), atol=1e-12)
    # an all-zero label row is the unconditional class; no cond at all is the unconditional denoiser
    zero = {"class_labels": torch.zeros(64, 3, dtype=torch.float64)}
    assert torch.equal(gmm.denoise(x, t, zero), gmm.denoise(x, t)) and torch.equal(gmm.denoise(x, t, {}),
                                                                                  gmm.denoise(x, t))
    with pytest.raises(ValueError, match="takes no conditioning"):
        GaussianMixture(**MIXTURE).denoise(x, t, conditioning.class_cond(labels, 3))


def test_conditional_rollouts_follow_each_class_mixtures_own_flow(tmp_path):
    gmm = GaussianMixture(**MIXTURE, num_classes=4)
    solver = SolverConfig(name="dpm3m", steps=32, grid="log_uniform")
    cfg = RolloutConfig(solver=solver, num_trajectories=48, batch_size=16, seed=3,
                        store=StoreConfig(chunk_trajectories=8, shard_chunks=2))
    path = run_rollouts(functools.partial(ExactDenoiser, gmm), tmp_path / "store.zarr", 48, (2,), cfg, "exact",
                        in_process=True, num_classes=4)
    store = open_store(path)
    assert store.cond_names == ("class_labels",) and verify_store(path).ok
    labels = store.read_cond(range(48))["class_labels"]
    assert torch.equal(labels, trajectory_cond(3, range(48), 4)["class_labels"])
    classes = labels.argmax(1)
    assert set(classes.tolist()) == {0, 1, 2, 3}  # uniform draws reach every class
    # closed form: trajectory k is class c_k's own mixture's probability-flow ODE from the same noise
    x_T = initial_noise(3, range(48), (2,), 80.0).double()
    fine = log_uniform_grid(512, 0.002, 80.0)
    ends = store.read(range(48))[:, -1].double()
    for c in range(4):
        rows = classes == c
        exact = solve(class_mixture(gmm, c).denoise, x_T[rows], fine, "dpm3m")[:, -1]
        assert (ends[rows] - exact).norm(dim=1).max() < 0.05
        nearest = (ends[rows, None, :] - gmm.means[None]).norm(dim=2).argmin(1)
        assert (gmm.mode_class[nearest] == c).all()  # every sample lands on a mode of its own class


class ClassMeanDenoiser(torch.nn.Module):
    """The posterior mean of a point mass at each class's mean image: a conditional teacher in closed form."""

    def __init__(self, class_means: torch.Tensor):
        super().__init__()
        self.class_means = class_means

    def forward(self, x, t, cond=None):
        return (cond["class_labels"] @ self.class_means.flatten(1)).view_as(x)


def test_a_digits_store_carries_its_labels_and_training_batches_return_them(tmp_path):
    data = load_data(DataConfig(name="digits", num_classes=10))
    assert data.num_classes == 10 and load_data(DataConfig(name="digits")).num_classes == 0
    batch = data.source(seed=1).batch(0, 32)  # a conditional data set's batches carry their labels
    idx = data.source(seed=1).sampler.indices(0, 32)
    assert torch.equal(batch["cond"]["class_labels"].argmax(1), data.train.labels(idx))
    assert data.source(seed=1, labels=False).batch(0, 32)["cond"] == {}

    class_means = torch.stack([data.train.read(data.train.labels(slice(None)) == c).mean(0) for c in range(10)])
    cfg = RolloutConfig(solver=SolverConfig(steps=4), num_trajectories=40, batch_size=8,
                        store=StoreConfig(chunk_trajectories=4, shard_chunks=2))
    path = run_rollouts(functools.partial(ClassMeanDenoiser, class_means), tmp_path / "digits.zarr", 40,
                        data.sample_shape, cfg, "means", in_process=True, num_classes=10)
    pairs = StorePairs(path, to_end=True, seed=0)
    batch, where = pairs.batch(2, 16), pairs.pair_indices(2, 16)
    stored = open_store(path).read_cond(where["traj"])["class_labels"]
    assert torch.equal(batch["cond"]["class_labels"], stored)
    # each clean end is its trajectory's class mean image, up to the noise left at sigma_min = 0.002
    assert (batch["x_s"] - class_means[stored.argmax(1)]).abs().max() < 0.002 * 6
    halves = [pairs.batch(2, 16, rank=r, world=2)["cond"]["class_labels"] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), batch["cond"]["class_labels"])  # DDP ranks slice the labels too
    pairs.close()


def test_unconditional_networks_refuse_a_label_rather_than_ignore_it():
    net = build_model("denoiser", {"kind": "mlp", "width": 16, "depth": 1, "emb_dim": 16, "sigma_data": 0.5}, (2,))
    x = torch.randn(4, 2)
    assert torch.equal(net(x, 1.0), net(x, 1.0, cond={}))
    with pytest.raises(ValueError, match="this MLP takes no conditioning"):
        net(x, 1.0, cond=conditioning.class_cond(torch.arange(4), 4))
