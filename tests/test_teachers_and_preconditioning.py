import pytest
import torch

from cmt_core.config import NetworkConfig
from cmt_core.data.synthetic import Checkerboard, GaussianMixture
from cmt_core.models import build_model, init_from
from cmt_core.objectives.meanflow import average_velocity


def monte_carlo_posterior_mean(distribution, x: torch.Tensor, t: float, n: int = 400_000) -> torch.Tensor:
    """E[x0 | x_t = x] by importance weighting data samples with the Gaussian likelihood N(x; x0, t^2)."""
    x0 = distribution.sample(n, torch.Generator().manual_seed(0)).double()
    logw = -((x[:, None, :] - x0[None]) ** 2).sum(-1) / (2 * t**2)
    w = torch.softmax(logw, dim=1)
    return w @ x0


@pytest.mark.parametrize("distribution", [GaussianMixture(8, 2.0, 0.2), Checkerboard()], ids=["gmm", "checker"])
@pytest.mark.parametrize("t", [0.3, 1.0, 3.0])
def test_exact_teacher_matches_monte_carlo_posterior_mean(distribution, t):
    x = torch.tensor([[1.2, 1.1], [-1.5, 1.0], [2.0, -0.3]], dtype=torch.float64)
    exact = distribution.denoise(x, torch.full((3,), t, dtype=torch.float64))
    assert torch.allclose(exact, monte_carlo_posterior_mean(distribution, x, t), atol=0.02)


def test_consistency_boundary_is_exact():
    model = build_model("consistency", NetworkConfig(width=32, depth=2).model_dump(), (2,), sigma_min=0.002)
    x = torch.randn(16, 2)
    assert torch.equal(model(x, 0.002), x)


def test_flow_map_identity_at_equal_times_and_velocity():
    model = build_model("flow_map", NetworkConfig(width=32, depth=2).model_dump(), (2,))
    x, t = torch.randn(16, 2), torch.rand(16) * 10 + 0.1
    assert torch.allclose(model(x, t, t), x)
    r = t / 3
    u = average_velocity(model, x, r, t)
    assert torch.allclose(model(x, t, r), x - (t - r)[:, None] * u, atol=1e-5)


def test_two_time_model_initialised_from_teacher_is_its_ddim_step():
    cfg = NetworkConfig(width=32, depth=2).model_dump()
    teacher = build_model("denoiser", cfg, (2,))
    for p in teacher.parameters():
        torch.nn.init.normal_(p, std=0.3)
    flow = init_from(build_model("flow_map", cfg, (2,)), teacher)
    x, t, s = torch.randn(8, 2), torch.full((8,), 2.0), torch.full((8,), 0.5)
    ddim = (s / t)[:, None] * x + (1 - s / t)[:, None] * teacher(x, t)
    assert torch.allclose(flow(x, t, s), ddim, atol=1e-5)


def test_with_the_boundary_at_evaluation_only_a_teacher_initialised_student_trains_as_the_teacher():
    network = NetworkConfig(width=32, depth=2, consistency_boundary="evaluation")
    torch.manual_seed(0)
    teacher = build_model("denoiser", network.model_dump(), (2,))
    student = init_from(build_model("consistency", network.model_dump(), (2,), sigma_min=0.002), teacher)
    x, t = torch.randn(16, 2), torch.rand(16) * 10 + 0.01
    assert torch.equal(student.train()(x, t), teacher(x, t))  # ECT's ECMPrecond in training: EDM's scalings
    assert torch.equal(student.eval()(x, 0.002), x)  # the boundary form at evaluation
    net = NetworkConfig(width=32, depth=2).model_dump()
    always = init_from(build_model("consistency", net, (2,), sigma_min=0.002), teacher)
    assert not torch.equal(always.train()(x, t), teacher(x, t))
