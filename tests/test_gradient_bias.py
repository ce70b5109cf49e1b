"""The paper's gradient-bias predictions on the exact mixture teacher (``cmt_core.gradient_bias``): the CMT
objective's bias falls as the rollout solver's step size to the power of its order and grows linearly with a
teacher error; consistency distillation's grows linearly with the anchor's gap to the clean end."""

import pytest
import torch

from cmt_core import gradient_bias as gb
from cmt_core.config import NetworkConfig
from cmt_core.data.synthetic import GaussianMixture
from cmt_core.models import build_model


@pytest.fixture(scope="module")
def setup():
    return gb.make_setup(GaussianMixture(8, 2.0, 0.1), samples=256)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    network = NetworkConfig(kind="mlp", width=64, depth=2, emb_dim=32, sigma_data=1.4)
    return build_model("consistency", network.model_dump(), (2,), 0.002).double()


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2), ("dpm3m", 3)])
def test_cmt_bias_falls_as_the_step_size_to_the_solvers_order(setup, model, solver, order):
    g = gb.oracle_gradient(model, setup)
    steps = (32, 64, 128, 256)
    biases = [gb.bias(g, gb.cmt_gradient(model, setup, solver, n)) for n in steps]
    slope = gb.fitted_slope([gb.step_size(setup, n) for n in steps], biases)
    assert abs(slope - order) < 0.3, (solver, slope, biases)


def test_cmt_bias_grows_linearly_with_the_teachers_error(setup, model):
    g = gb.oracle_gradient(model, setup)
    eps = [1e-3, 1e-2, 1e-1]
    biases = [gb.bias(g, gb.cmt_gradient(model, setup, "dpm3m", 256, e)) for e in eps]
    assert abs(gb.fitted_slope(eps, biases) - 1) < 0.2


def test_distillation_bias_grows_with_the_anchor_gap(setup, model):
    g = gb.oracle_gradient(model, setup, min_time=0.5)
    anchors = [0.004, 0.01, 0.03, 0.1]
    biases = [gb.bias(g, gb.cd_gradient(model, setup, u, 128, min_time=0.5)) for u in anchors]
    assert abs(gb.fitted_slope([u - setup.sigma_min for u in anchors], biases) - 1) < 0.3
    assert gb.bias(gb.oracle_gradient(model, setup), gb.cd_adjacent_gradient(model, setup)) > 0


def test_step_counts_must_keep_the_coarse_times_on_the_grid(setup, model):
    with pytest.raises(ValueError, match="multiple of 16"):
        gb.cmt_gradient(model, setup, "heun", 24)
