"""Loss sanity on cases whose answer is known in closed form (Gaussian data N(0, s^2 I))."""

import pytest
import torch
from torch import nn

from cmt_core.objectives.base import StepRandom
from cmt_core.objectives.cmt import CMTLoss
from cmt_core.objectives.distances import l2_norm
from cmt_core.objectives.ect import ECTLoss
from cmt_core.objectives.meanflow import MeanFlowLoss, meanflow_target
from cmt_core.solvers import solve
from cmt_core.time_grids import log_uniform_grid
from cmt_core.trajectories.pairs import TrajectoryPairs

S = 0.7  # data std
SIGMA_MIN = 0.002


def gaussian_denoiser(x, t, cond=None):
    return (S**2 / (S**2 + t**2)).reshape(-1, 1) * x


def exact_map(x, t, s):
    """Flow map of the Gaussian's PF-ODE: x_s = x_t sqrt(S^2 + s^2) / sqrt(S^2 + t^2)."""
    return x * ((S**2 + s**2) / (S**2 + t**2)).sqrt().reshape(-1, 1)


class ExactConsistency(nn.Module):
    def forward(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=x.dtype).expand(len(x))
        return exact_map(x, t, torch.full((len(x),), SIGMA_MIN, dtype=x.dtype))


class ExactFlowMap(nn.Module):
    def forward(self, x, t, s, cond=None):
        return exact_map(x, t, s)

    def average_velocity(self, x, r, t):
        return (x - exact_map(x, t, r)) / (t - r).reshape(-1, 1)


class Constant(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x, t, cond=None):
        return self.value.expand_as(x)


@pytest.mark.parametrize("huber_c", [0.0, 0.03])
def test_ect_loss_of_an_exactly_consistent_map_is_zero(huber_c):
    y0 = torch.tensor([[0.3, -0.8]])
    batch = {"x": y0.expand(64, 2)}
    loss = ECTLoss(huber_c=huber_c)(Constant(y0), batch, StepRandom(0, 5, 64))
    assert torch.count_nonzero(loss) == 0


class Scaled(nn.Module):
    """f(x, t) = t x: simple enough to compute ECT's loss by hand."""

    def forward(self, x, t, cond=None):
        return x * torch.as_tensor(t, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1))


class QueuedRandom:
    """A stand-in for ``StepRandom`` that hands out the given normals in order (step 0)."""

    step = 0

    def __init__(self, *normals):
        self.normals = list(normals)

    def randn(self, *tail):
        return self.normals.pop(0)

    def seed(self):
        return 0


@pytest.mark.parametrize("huber_c,expected", [(0.0, [30.0, 5**0.5 / 2]),  # ||f(x_t, t) - f(x_r, r)|| / (t - r)
                                              (11.0, [25.0, ((5 / 16 + 121) ** 0.5 - 11) / 0.5])])
def test_ect_loss_is_the_per_sample_norm_or_pseudo_huber_over_t_minus_r(huber_c, expected):
    # k = 0, q = 2, stage 0: r = t / 2. Sample 0: t = 4, y = 0, e = (3, 4): x_t = (12, 16), x_r = (6, 8),
    # f(x_t, t) - f(x_r, r) = (48, 64) - (12, 16) = (36, 48), norm 60, over t - r = 2: 30; c = 11: (61 - 11) / 2.
    # Sample 1: t = 1, y = (1, -1), e = (0, 1): (1, 0) - (0.5, -0.25), norm sqrt(5) / 4, over 0.5.
    cfg = dict(p_mean=0.0, p_std=1.0, k=0.0, q=2.0, huber_c=huber_c)
    rng = QueuedRandom(torch.tensor([4.0, 1.0], dtype=torch.float64).log(),
                       torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=torch.float64))
    y = torch.tensor([[0.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    loss = ECTLoss(**cfg)(Scaled(), {"x": y}, rng)
    assert torch.allclose(loss, torch.tensor(expected, dtype=torch.float64), rtol=1e-12)


def test_ect_targets_the_frozen_mid_trained_model_at_or_below_anchor_sigma():
    # the hand case above (k = 0, q = 2: r = t / 2) with anchor_sigma = 2: sample 0 (t = 4) keeps ECT's target,
    # sample 1 (t = 1) is compared with the anchor's f(x_t, t) = 0: ||f(x_t, t)|| / (t - r) = ||(1, 0)|| / 0.5
    cfg = dict(p_mean=0.0, p_std=1.0, k=0.0, q=2.0, anchor_sigma=2.0)
    rng = QueuedRandom(torch.tensor([4.0, 1.0], dtype=torch.float64).log(),
                       torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=torch.float64))
    y = torch.tensor([[0.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    anchor = Constant(torch.zeros(1, 2, dtype=torch.float64))
    loss = ECTLoss(**cfg, anchor=anchor)(Scaled(), {"x": y}, rng)
    assert torch.allclose(loss, torch.tensor([30.0, 2.0], dtype=torch.float64), rtol=1e-12)
    with pytest.raises(ValueError, match="anchor"):
        ECTLoss(**cfg)


def test_cmt_mf_form_in_tau_time_is_the_papers_velocity_distance():
    # tau = t / (1 + t), z = (1 - tau) x: tau_t = 2/3, z_t = (2/3, 1/3); tau_s = 3/5, z_s = (0.4, 0.4);
    # target U = (z_t - z_s) / (tau_t - tau_s) = (4, -1); the model's z_s = (1 - tau_s) f = (0.2, 0.1), so
    # U = (7, 3.5), and ||U - target||^2 = 3^2 + 4.5^2 (= (1 + t)^2 / (t - s)^2 ||f - x_s||^2 = 36 * 0.8125)
    x_t, x_s = torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 1.0]])
    batch = {"x_t": x_t, "t": torch.tensor([2.0]), "x_s": x_s, "s": torch.tensor([1.5])}
    model = lambda x, t_, s_, cond=None: x * 0.25  # noqa: E731
    assert CMTLoss("mf")(model, batch, None).item() == pytest.approx(3**2 + 4.5**2)
    assert CMTLoss("mf", l2_norm)(model, batch, None).item() == pytest.approx((3**2 + 4.5**2) ** 0.5)


def test_ecd_loss_of_the_true_flow_map_vanishes_with_the_teacher_step():
    batch = {"x": S * torch.randn(256, 2, dtype=torch.float64)}
    losses = []
    for step, stage_steps in ((0, 1), (4, 1)):  # later stages: smaller t - r
        cfg = dict(stage_steps=stage_steps)
        loss = ECTLoss(**cfg, teacher=gaussian_denoiser, teacher_solver="heun")
        losses.append(loss(ExactConsistency(), {"x": batch["x"]}, StepRandom(0, step, 256)).mean().item())
    # Heun's local error is O((t - r)^3), so ||error|| / (t - r) falls as (t - r)^2: 16x smaller steps, >100x
    assert losses[1] < losses[0] / 100 and losses[1] < 1e-3


def test_meanflow_target_equals_true_average_velocity():
    x_t = torch.randn(32, 2, dtype=torch.float64) * 3
    t = torch.rand(32, dtype=torch.float64) * 5 + 0.5
    r = t * torch.rand(32, dtype=torch.float64)
    v = (x_t - gaussian_denoiser(x_t, t)) / t.reshape(-1, 1)  # the marginal PF-ODE velocity
    model = ExactFlowMap()
    u, target = meanflow_target(model.average_velocity, x_t, r, t, v)
    assert torch.allclose(target, u, atol=1e-10)
    assert torch.allclose(u, (x_t - exact_map(x_t, t, r)) / (t - r).reshape(-1, 1))


def test_meanflow_loss_has_gradients_and_adaptive_weight():
    from cmt_core.config import NetworkConfig
    from cmt_core.models import build_model

    model = build_model("flow_map", NetworkConfig(width=32, depth=2).model_dump(), (2,))
    loss = MeanFlowLoss(adaptive_p=1.0)(model, {"x": torch.randn(16, 2)}, StepRandom(0, 0, 16))
    assert loss.shape == (16,)
    assert (loss <= 1).all() and loss.median() > 0.9  # err / (err + 1e-3): about 1 where err >> 1e-3
    loss.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("form,model",
                         [("cm", ExactConsistency()), ("flow_map", ExactFlowMap()), ("mf", ExactFlowMap())])
def test_cmt_loss_of_true_flow_map_tends_to_zero_as_solver_step_shrinks(form, model):
    x_T = 80 * torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    losses = []
    for steps in (8, 32, 128):
        grid = log_uniform_grid(steps, SIGMA_MIN, 80.0)
        pairs = TrajectoryPairs(solve(gaussian_denoiser, x_T, grid, "euler"), grid, to_end=form == "cm")
        batch = pairs.batch(0, 256)
        batch = {k: v if k == "cond" else v.double() for k, v in batch.items()}
        losses.append(CMTLoss(form)(model, batch, None).mean().item())
    assert losses[0] > losses[1] > losses[2]
    assert losses[2] < losses[0] / 10
