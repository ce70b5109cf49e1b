"""Mean Flow and the flow map: py-meanflow's loss in its own time, the JVP target, the flow map's clean end,
the Mean Flow presets."""

import math

import pytest
import torch
from torch import nn

from cmt_core.config import NetworkConfig
from cmt_core.models import build_model, load_model, save_model
from cmt_core.objectives.base import StepRandom
from cmt_core.objectives.meanflow import MeanFlowLoss, average_velocity, meanflow_target, tau_velocity
from cmt_core.presets import get_preset
from cmt_core.stages import plan

SMALL_MLP = NetworkConfig(width=32, depth=2, emb_dim=16).model_dump()


class Draws:
    """Hands an objective fixed random numbers in the order it asks: the two normals of the times (ln t and ln r
    with p_mean = 0, p_std = 1), the uniform of r = t, then the noise e."""

    def __init__(self, *seq):
        self.seq = list(seq)

    def randn(self, *tail):
        return self.seq.pop(0)

    def rand(self, *tail):
        return self.seq.pop(0)


class Shrink(nn.Module):
    """A flow map whose two-time denoiser is D~(x, t, s) = a x: u(x_t, r, t) = (1 - a) x_t / t; in tau time
    U(z, tau_r, tau_t) = k(tau_t) z with k(tau) = (1 - a - tau) / (tau (1 - tau))."""

    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))

    def denoise(self, x, t, s, cond=None):
        return self.a * x


def test_tau_loss_is_py_meanflows_loss_on_a_hand_computed_case():
    a, p, eps = 0.3, 0.75, 1e-3
    y = torch.tensor([[0.5, -1.0, 0.25]], dtype=torch.float64)
    e = torch.tensor([[1.0, 0.5, -2.0]], dtype=torch.float64)
    ln_t, ln_r = math.log(3.0), math.log(0.5)  # t = 3, r = 0.5: tau_t = 3/4, tau_r = 1/3
    cfg = dict(time="tau", adaptive_p=p, norm_eps=eps, equal_fraction=0.0, p_mean=0.0)
    draws = Draws(torch.tensor([ln_t]), torch.tensor([ln_r]), torch.tensor([0.5]), e)
    loss = MeanFlowLoss(**cfg)(Shrink(a), {"x": y}, draws)

    # py-meanflow, by hand: z = (1 - tau) y + tau e, V = e - y, target V - (tau_t - tau_r) dU/dtau_t along z(tau)
    tau_t, tau_r = 0.75, 1 / 3
    k = (1 - a - tau_t) / (tau_t * (1 - tau_t))
    dk = (-(tau_t * (1 - tau_t)) - (1 - a - tau_t) * (1 - 2 * tau_t)) / (tau_t * (1 - tau_t)) ** 2
    z, V = (1 - tau_t) * y + tau_t * e, e - y
    target = V - (tau_t - tau_r) * (dk * z + k * V)
    raw = ((k * z - target) ** 2).sum()
    assert loss.item() == pytest.approx((raw / (raw + eps) ** p).item(), rel=1e-6)


def test_sigma_loss_is_the_per_dimension_velocity_error():
    a = 0.3
    y = torch.tensor([[0.5, -1.0, 0.25]], dtype=torch.float64)
    e = torch.tensor([[1.0, 0.5, -2.0]], dtype=torch.float64)
    cfg = dict(time="sigma", adaptive_p=0.0, equal_fraction=0.0, p_mean=0.0)
    draws = Draws(torch.tensor([math.log(3.0)]), torch.tensor([math.log(0.5)]), torch.tensor([0.5]), e)
    loss = MeanFlowLoss(**cfg)(Shrink(a), {"x": y}, draws)
    t, r = 3.0, 0.5  # u = (1 - a) x_t / t, du/dt along x_t = y + t e is (1 - a) (e t - x_t) / t^2 = -(1 - a) y / t^2
    x_t = y + t * e
    target = e - (t - r) * (-(1 - a) * y / t**2)
    assert loss.item() == pytest.approx((((1 - a) * x_t / t - target) ** 2).mean().item(), rel=1e-6)


def test_the_two_times_give_the_same_fixed_point_with_gradients_in_a_known_ratio():
    # tau err = (1 + t)^4 / (1 + r)^2 * dim * sigma err, but the gradient ratio is (1 + t)^3 / (1 + r) * dim
    torch.manual_seed(0)
    model = build_model("flow_map", SMALL_MLP, (4,)).double()
    with torch.no_grad():
        for q in model.parameters():
            q.add_(0.1 * torch.randn_like(q))
    y, e = torch.randn(1, 4, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)
    ln_t, ln_r, t, r = torch.tensor([1.0]), torch.tensor([-1.0]), math.e, math.exp(-1.0)
    losses, grads = {}, {}
    for time in ("sigma", "tau"):
        cfg = dict(time=time, adaptive_p=0.0, equal_fraction=0.0, p_mean=0.0)
        losses[time] = MeanFlowLoss(**cfg)(model, {"x": y}, Draws(ln_t, ln_r, torch.tensor([0.5]), e)).sum()
        grads[time] = torch.cat([g.flatten() for g in torch.autograd.grad(losses[time], list(model.parameters()))])
    assert losses["tau"].item() == pytest.approx(losses["sigma"].item() * 4 * (1 + t) ** 4 / (1 + r) ** 2, rel=1e-4)
    assert torch.allclose(grads["tau"], grads["sigma"] * 4 * (1 + t) ** 3 / (1 + r), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("time", ["sigma", "tau"])
def test_the_jvp_target_holds_the_finite_difference_derivative_along_the_path(time):
    torch.manual_seed(1)
    model = build_model("flow_map", SMALL_MLP, (4,), sigma_min=0.002).double()
    with torch.no_grad():
        for q in model.parameters():
            q.add_(0.1 * torch.randn_like(q))
    y, e = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    t = torch.tensor([0.05, 0.3, 1.0, 2.0, 5.0, 10.0, 30.0, 80.0], dtype=torch.float64)
    r = t * torch.linspace(0.0, 0.9, 8, dtype=torch.float64)
    if time == "sigma":
        fn, s_t, s_r, path, v = (lambda x, r_, t_: average_velocity(model, x, r_, t_)), t, r, \
            (lambda s: y + s[:, None] * e), e
    else:
        fn, s_t, s_r, v = (lambda z, r_, t_: tau_velocity(model, z, r_, t_)), t / (1 + t), r / (1 + r), e - y
        path = lambda s: (1 - s[:, None]) * y + s[:, None] * e  # noqa: E731
    u, target = meanflow_target(fn, path(s_t), s_r, s_t, v)
    jvp = (v - target) / (s_t - s_r)[:, None]
    h = 1e-3 * s_t * (1 - s_t if time == "tau" else 1)
    fd = (fn(path(s_t + h), s_r, s_t + h) - fn(path(s_t - h), s_r, s_t - h)) / (2 * h[:, None])
    # times reach the network as float32 (``as_batch``): the difference quotient carries about 1e-7 / 1e-3
    assert torch.allclose(jvp, fd, rtol=2e-3, atol=2e-3 * float(fd.abs().max()))


def test_tau_velocity_is_the_average_velocity_of_the_flow_map_in_tau_time():
    torch.manual_seed(2)
    model = build_model("flow_map", SMALL_MLP, (4,), sigma_min=0.002).double()
    x_t = torch.randn(5, 4, dtype=torch.float64) * 3
    t = torch.tensor([0.1, 0.5, 2.0, 10.0, 80.0], dtype=torch.float64)
    r = t / 3
    tau_t, tau_r = t / (1 + t), r / (1 + r)
    z_t, z_r = x_t / (1 + t)[:, None], model(x_t, t, r) / (1 + r)[:, None]  # z = (1 - tau) x
    expected = (z_t - z_r) / (tau_t - tau_r)[:, None]
    assert torch.allclose(tau_velocity(model, z_t, tau_r, tau_t), expected, rtol=1e-5, atol=1e-5)


def test_log_normal_sigma_is_the_logit_normal_tau():
    n = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    cfg = dict(p_mean=-0.4, p_std=1.0, equal_fraction=0.0)
    t, r = MeanFlowLoss(**cfg).sample_times(Draws(n, n.flip(0), torch.rand(1000)))
    tau = torch.sigmoid(-0.4 + 1.0 * n)
    assert torch.allclose(torch.maximum(t / (1 + t), r / (1 + r)), torch.maximum(tau, tau.flip(0)), atol=1e-6)


def test_a_flow_map_jumps_to_zero_as_to_its_clean_end(tmp_path):
    torch.manual_seed(4)
    model = build_model("flow_map", SMALL_MLP, (4,), sigma_min=0.002)
    with torch.no_grad():
        for q in model.parameters():
            q.add_(0.1 * torch.randn_like(q))  # the second time's embedding starts at zero: make it matter
    x, t = torch.randn(6, 4) * 80, torch.full((6,), 80.0)
    assert torch.equal(model.denoise(x, t, torch.zeros(6)), model.denoise(x, t, torch.full((6,), 0.002)))
    assert not torch.equal(model.denoise(x, t, torch.zeros(6)), model.denoise(x, t, torch.full((6,), 0.01)))
    assert torch.equal(model(x, t, 0.0), model.denoise(x, t, torch.zeros(6)))
    save_model(tmp_path / "m.pt", model, "flow_map", SMALL_MLP, (4,))
    loaded = load_model(tmp_path / "m.pt")
    assert loaded.sigma_min == 0.002 and torch.equal(loaded(x, t, 0.0), model.eval()(x, t, 0.0))


@pytest.mark.parametrize("name,base", [("digits-meanflow", "digits"), ("toy-meanflow", "toy")])
def test_meanflow_presets_reuse_the_teacher_and_rollouts_and_post_train_with_mean_flow(name, base):
    cfg, ref = get_preset(name), get_preset(base)
    ids, ref_ids = plan(cfg).ids, plan(ref).ids
    assert ids["teacher"] == ref_ids["teacher"] and ids["rollouts"] == ref_ids["rollouts"]
    assert cfg.midtrain.form == "flow_map" and cfg.midtrain.init == "teacher"
    assert cfg.posttrain.method == "meanflow" and cfg.posttrain.init == "cmt"
    assert cfg.posttrain.meanflow.time == "tau"


@pytest.mark.slow
def test_toy_meanflow_pipeline(tmp_path):
    from cmt_core.pipeline import run_pipeline
    from cmt_core.runtime import Runtime

    results = run_pipeline(get_preset("toy-meanflow", artifact_root=tmp_path), Runtime(torch.device("cpu")))
    rows = {r["model"]: r for r in results["evaluation"].metrics["rows"]}
    baseline = rows["teacher-initialised, untrained"]["flow_map_error"]
    cmt = rows["CMT (mid-trained), 1-step"]["flow_map_error"]
    post = rows["MEANFLOW from cmt, 1-step"]["flow_map_error"]
    assert cmt * 20 <= baseline and post <= cmt


def test_mean_flow_trains_a_unet_under_bf16_autocast_on_cpu():
    # the JVP through the U-Net's group norms: their output and its tangent stay in one dtype (``GroupNorm32``)
    net = NetworkConfig(kind="unet", width=16, channel_mult=[1, 2], depth=1, emb_dim=32, attention_resolutions=[16])
    flow_map = build_model("flow_map", net.model_dump(), (3, 32, 32), 0.002)
    rng = StepRandom(0, 0, 4, 0, 1, torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = MeanFlowLoss()(flow_map, {"x": torch.randn(4, 3, 32, 32)}, rng).float().mean()
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in flow_map.parameters() if p.requires_grad)


def test_guided_mean_flow_trains_a_dit_under_bf16_autocast_on_cpu():
    # the JVP through attention (math kernel) and LayerNorm in bf16, with the guided target's extra calls
    net = NetworkConfig(kind="dit", width=64, depth=2, heads=4, patch_size=2, sigma_data=1.0)
    flow_map = build_model("flow_map", {**net.model_dump(), "label_dim": 3}, (4, 8, 8), 0.002)
    rng = StepRandom(0, 0, 4, 0, 1, torch.device("cpu"))
    batch = {"x": torch.randn(4, 4, 8, 8), "cond": {"class_labels": nn.functional.one_hot(torch.arange(4) % 3,
                                                                                          3).float()}}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = MeanFlowLoss(omega=0.5, kappa=0.3)(flow_map.train(), batch, rng).float().mean()
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in flow_map.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------- guidance in the target
GUIDED_CLASSES = 4


def conditional_flow_map() -> nn.Module:
    torch.manual_seed(0)
    flow_map = build_model("flow_map", {**SMALL_MLP, "label_dim": GUIDED_CLASSES}, (2,), sigma_min=0.002)
    with torch.no_grad():
        for p in flow_map.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return flow_map.train()


def labelled_batch(n: int = 64) -> dict:
    gen = torch.Generator().manual_seed(3)
    labels = nn.functional.one_hot(torch.randint(GUIDED_CLASSES, (n,), generator=gen), GUIDED_CLASSES).float()
    labels[::5] = 0  # dropped labels: the unconditional class
    return {"x": torch.randn(n, 2, generator=gen), "cond": {"class_labels": labels}}


@pytest.mark.parametrize("time", ["tau", "sigma"])
def test_guidance_at_omega_one_kappa_zero_is_the_unguided_loss(time):
    flow_map, batch = conditional_flow_map(), labelled_batch()
    losses, grads = [], []
    for kwargs in ({}, {"omega": 1.0, "kappa": 0.0, "interval": (0.2, 0.7)}):
        loss = MeanFlowLoss(time=time, **kwargs)(flow_map, batch, StepRandom(5, 0, 64))
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss.mean(), list(flow_map.parameters())))
    assert torch.equal(losses[0], losses[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    guided = MeanFlowLoss(time=time, omega=0.5, kappa=0.2)(flow_map, batch, StepRandom(5, 0, 64)).detach()
    assert not torch.equal(guided, losses[0])  # and guidance does change it


@pytest.mark.parametrize("time", ["tau", "sigma"])
def test_guided_velocity_mixes_the_labelled_rows_inside_the_interval(time):
    flow_map, batch = conditional_flow_map(), labelled_batch()
    cond, n = batch["cond"], 64
    t = torch.exp(torch.linspace(-4.0, 3.0, n))
    tau = t / (1 + t)
    v = torch.randn(n, 2)
    omega, kappa, interval = 0.3, 0.6, (0.1, 0.75)
    velocity = tau_velocity if time == "tau" else average_velocity
    at = tau if time == "tau" else t
    x = torch.randn(n, 2)
    loss = MeanFlowLoss(time=time, omega=omega, kappa=kappa, interval=interval)
    got = loss.guided_velocity(flow_map, velocity, x, at, v, cond, None if time == "tau" else tau)
    assert flow_map.training and not got.requires_grad
    with torch.no_grad():
        flow_map.eval()
        u_cond = velocity(flow_map, x, at, at, cond)
        u_uncond = velocity(flow_map, x, at, at, {"class_labels": torch.zeros_like(cond["class_labels"])})
    expected = omega * v + kappa * u_cond + (1 - omega - kappa) * u_uncond
    rows = (cond["class_labels"].sum(1) > 0) & (tau >= interval[0]) & (tau <= interval[1])
    assert 0 < int(rows.sum()) < n
    torch.testing.assert_close(got[rows], expected[rows])
    assert torch.equal(got[~rows], v[~rows])  # dropped labels and times outside the interval keep v


def test_guidance_in_the_target_needs_classes_label_dropout_and_mean_flow():
    guided = ["posttrain.meanflow.guidance.omega=0.5", "posttrain.method=meanflow", "midtrain.form=flow_map",
              "posttrain.ect.anchor_sigma=0"]
    with pytest.raises(ValueError, match="posttrain.method='meanflow'"):
        get_preset("digits-cond", ["posttrain.meanflow.guidance.omega=0.5"])
    with pytest.raises(ValueError, match="data.num_classes > 0"):
        get_preset("digits", guided)
    with pytest.raises(ValueError, match="posttrain.train.label_dropout must be > 0"):
        get_preset("digits-cond", guided)
    cfg = get_preset("digits-cond", [*guided, "posttrain.train.label_dropout=0.1"])
    assert cfg.posttrain.meanflow.guidance.active
    with pytest.raises(ValueError, match="t_start=0.8 must be <= t_end=0.5"):
        get_preset("digits-cond", [*guided, "posttrain.meanflow.guidance.t_start=0.8",
                                   "posttrain.meanflow.guidance.t_end=0.5"])
