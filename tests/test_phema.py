"""EDM2's power-function EMA (``cmt_core.phema``) and its post-hoc reconstruction, alone and in the training loop."""

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from cmt_core.checkpoint import CheckpointError
from cmt_core.config import NetworkConfig, PipelineConfig, TrainConfig
from cmt_core.data.sources import SyntheticSource
from cmt_core.data.synthetic import GaussianMixture
from cmt_core.models import build_model
from cmt_core.objectives.edm import EDMLoss
from cmt_core.phema import (
    MAX_STD,
    PowerFunctionEMA,
    combine_state_dicts,
    exponent_to_std,
    power_function_beta,
    power_function_correlation,
    power_function_response,
    solve_posthoc_coefficients,
    std_to_exponent,
)
from cmt_core.runtime import Runtime
from cmt_core.training import posthoc_ema, snapshot_path, snapshot_steps, train


def flat(state: dict) -> torch.Tensor:
    return torch.cat([v.detach().double().flatten() for v in state.values()])


def test_std_and_exponent_convert_both_ways():
    # EDM2 (section 3.1): gamma = 16.97 is std 0.05, gamma = 6.94 is std 0.10
    assert std_to_exponent(0.05) == pytest.approx(16.97, abs=0.01)
    assert std_to_exponent(0.10) == pytest.approx(6.94, abs=0.01)
    stds = np.linspace(0.001, MAX_STD * 0.999, 500)
    assert np.allclose(exponent_to_std(std_to_exponent(stds)), stds, rtol=1e-12, atol=0)
    assert np.all(std_to_exponent(stds) > 0) and np.all(np.diff(std_to_exponent(stds)) < 0)
    for bad in (0.0, -0.1, MAX_STD, 0.3):
        with pytest.raises(ValueError, match="relative std"):
            std_to_exponent(bad)


def test_the_power_function_ema_is_the_closed_form_power_function_average():
    """A scalar parameter that is ``f(k)`` after step ``k``: after ``t`` steps the EMA of exponent ``gamma`` is
    ``sum_k (k^(g+1) - (k-1)^(g+1)) / t^(g+1) f(k)`` (the power-function density integrated over each step)."""
    module = nn.Module()
    module.theta = nn.Parameter(torch.tensor(0.0, dtype=torch.float64))
    stds = (0.05, 0.10, 0.20)
    ema = PowerFunctionEMA(module, stds)
    f = lambda k: np.sin(0.05 * k) + 0.01 * k  # noqa: E731
    steps = 400
    for t in range(1, steps + 1):
        with torch.no_grad():
            module.theta.fill_(f(t))
        ema.update(module, t)
        if t in (1, 7, 100, 400):
            k = np.arange(1, t + 1, dtype=np.float64)
            for std, tracked in zip(stds, ema.models):
                a = std_to_exponent(std) + 1
                closed = np.sum((k ** a - (k - 1) ** a) / t ** a * f(k))
                assert tracked.theta.item() == pytest.approx(closed, abs=1e-12)
                assert power_function_response(t, std, t + 1) @ f(np.arange(t + 1.0)) == pytest.approx(closed,
                                                                                                       abs=1e-12)
    # its continuous limit: a linear trajectory theta(tau) = tau held as ceil(tau) averages to (g+1)/(g+2) t + [0, 1)
    for std in stds:
        g = std_to_exponent(std)
        average = power_function_response(steps, std, steps + 1) @ np.arange(steps + 1.0)
        assert 0 <= average - (g + 1) / (g + 2) * steps < 1
    assert power_function_beta(0.1, 1) == 0.0  # the initial weights never count
    assert power_function_beta(0.1, 10) == pytest.approx(0.9 ** (std_to_exponent(0.1) + 1))


def test_correlations_are_the_inner_products_of_the_profiles():
    """The closed form against the integral of the two densities, by Gauss-Legendre quadrature over the interval
    both cover, (0, min(ofs_a, ofs_b)], where their product is smooth."""
    nodes, weights = np.polynomial.legendre.leggauss(200)
    density = lambda tau, ofs, std: ((std_to_exponent(std) + 1) * tau ** std_to_exponent(std)  # noqa: E731
                                     / ofs ** (std_to_exponent(std) + 1))
    for a, b in (((100, 0.05), (300, 0.1)), ((300, 0.05), (100, 0.2)), ((200, 0.1), (200, 0.1)), ((7, 0.2), (9, 0.01))):
        end = min(a[0], b[0])
        tau = (nodes + 1) * end / 2
        numeric = np.sum(weights * density(tau, *a) * density(tau, *b)) * end / 2
        assert power_function_correlation(a[0], a[1], b[0], b[1]) == pytest.approx(numeric, rel=1e-10)


def random_walk(steps: int, every: int, stds):
    """A module whose float64 parameters take a seeded random walk with drift; the power-function EMAs of ``stds``
    tracked along, snapshots of all of them every ``every`` steps, and the trajectory (row k: after step k)."""
    generator = torch.Generator().manual_seed(0)
    module = nn.Linear(4, 3).double()
    ema = PowerFunctionEMA(module, stds)
    trajectory, snapshots = [flat(module.state_dict())], {}
    for t in range(1, steps + 1):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=generator, dtype=torch.float64) + 0.01)
        ema.update(module, t)
        trajectory.append(flat(module.state_dict()))
        if t % every == 0:
            snapshots[t] = [{k: v.clone() for k, v in m.state_dict().items()} for m in ema.models]
    return torch.stack(trajectory).numpy(), snapshots, ema


@pytest.mark.parametrize("at", [250, 500])
def test_posthoc_reconstruction_at_an_untracked_std_matches_the_tracked_ema(at):
    """Snapshots of std 0.05 and 0.10 every 25 steps reconstruct the EMA of std 0.075, tracked alongside.

    Tolerance: with ``r`` the response of the reconstruction (``sum_i c_i`` times each snapshot's response) and
    ``w`` the tracked EMA's, the error in a coordinate is ``sum_k (r_k - w_k) theta_k``; both sum to 1, so it is at
    most ``||r - w||_1 * max_k |theta_k - theta_at|``, computed here from the trajectory (plus float64 rounding).
    Not vacuous: ``||r - w||_1`` is under 1% of the profiles' mass, and the error under 1% of the gap between the
    two tracked EMAs."""
    length = 501
    trajectory, snapshots, ema = random_walk(length - 1, 25, (0.05, 0.10, 0.075))
    used = [t for t in snapshots if t <= at]
    ofs, std = np.repeat(used, 2), np.tile([0.05, 0.10], len(used))
    coefficients = solve_posthoc_coefficients(ofs, std, at, 0.075)
    assert coefficients.shape == (2 * len(used), 1) and coefficients.sum() == pytest.approx(1.0, abs=1e-12)
    rebuilt = flat(combine_state_dicts((sd for t in used for sd in snapshots[t][:2]), coefficients[:, 0])).numpy()
    tracked = flat(snapshots[at][2]).numpy()

    response = coefficients[:, 0] @ power_function_response(ofs, std, length)
    mismatch = np.abs(response - power_function_response(at, 0.075, length)).sum()
    bound = mismatch * np.abs(trajectory[:at + 1] - trajectory[at]).max(axis=0) + 1e-12
    assert np.all(np.abs(rebuilt - tracked) <= bound)
    gap = np.abs(flat(snapshots[at][0]).numpy() - flat(snapshots[at][1]).numpy())
    assert mismatch < 0.01 and np.abs(rebuilt - tracked).max() < 0.01 * gap.max()


def test_combining_copies_buffers_and_counters_from_the_last_snapshot():
    states = [{"w": torch.tensor([1.0, 2.0]), "running": torch.tensor([5.0]), "count": torch.tensor(3)},
              {"w": torch.tensor([3.0, 6.0]), "running": torch.tensor([7.0]), "count": torch.tensor(4)}]
    out = combine_state_dicts(states, [0.25, 0.75], copy_keys=["running"])
    assert torch.equal(out["w"], torch.tensor([2.5, 5.0])) and out["w"].dtype == torch.float32
    assert torch.equal(out["running"], torch.tensor([7.0])) and torch.equal(out["count"], torch.tensor(4))
    with pytest.raises(ValueError, match="3 coefficients"):
        combine_state_dicts(states, [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="repeat an"):
        solve_posthoc_coefficients([10, 10], [0.05, 0.05], 10, 0.07)


# ------------------------------------------------------------------------------------------- the training loop

NET = NetworkConfig(width=32, depth=2, emb_dim=16, dropout=0.1).model_dump()


def power_run(run_dir, total: int, until: int | None = None, evaluate=None, lr: float = 1e-3, **ema):
    """A small EDM run with power-function EMAs; ``until``: first that many steps, then a fresh process's model
    resumed from the checkpoint."""
    cfg = TrainConfig(steps=total, batch_size=64, lr=lr, checkpoint_every=10, log_every=5,
                      eval_every=10 if evaluate else None, keep="one_step", **ema)
    runtime = Runtime(torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model("denoiser", NET, (2,))
    if until is not None:
        train(model, EDMLoss(), SyntheticSource(GaussianMixture()), cfg, run_dir, runtime, evaluate=evaluate,
              until=until)
        torch.manual_seed(123)  # a resumed process starts with other RNG state and fresh weights
        model = build_model("denoiser", NET, (2,))
    return train(model, EDMLoss(), SyntheticSource(GaussianMixture()), cfg, run_dir, runtime, evaluate=evaluate), model


def weights_score(model):
    """A deterministic score of the weights (lower is better), so that keep selects a real step."""
    total = sum(float((p.double() ** 2).sum()) for p in model.parameters())
    return {"score_1step": total, "score_2step": total}


def test_a_power_ema_run_resumed_from_a_checkpoint_equals_an_uninterrupted_one_bit_for_bit(tmp_path):
    ema = {"ema_stds": (0.05, 0.10), "ema_snapshot_every": 5, "posthoc_std": 0.07}
    straight, straight_model = power_run(tmp_path / "a", 40, evaluate=weights_score, **ema)
    resumed, resumed_model = power_run(tmp_path / "b", 40, until=20, evaluate=weights_score, **ema)
    for a, b in zip(straight_model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)  # the kept post-hoc EMA
    assert straight.best_step == resumed.best_step and straight.best_metrics == resumed.best_metrics
    ckpt_a, ckpt_b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (tmp_path / "a", tmp_path / "b"))
    assert set(ckpt_a) == {"model", "ema", "optimizer", "step", "best"} and ckpt_a["ema"]["stds"] == [0.05, 0.10]
    for ema_a, ema_b in zip(ckpt_a["ema"]["emas"], ckpt_b["ema"]["emas"], strict=True):  # every tracked EMA
        for a, b in zip(ema_a.values(), ema_b.values(), strict=True):
            assert torch.equal(a, b)
    assert snapshot_steps(tmp_path / "a") == snapshot_steps(tmp_path / "b") == list(range(5, 41, 5))
    for step in snapshot_steps(tmp_path / "a"):
        assert snapshot_path(tmp_path / "a", step).read_bytes() == snapshot_path(tmp_path / "b", step).read_bytes()


def test_a_run_returns_the_posthoc_ema_and_it_matches_a_run_that_tracked_that_std(tmp_path):
    """The EMA does not steer training: a run tracking 0.07 directly follows the same weights as one tracking 0.05
    and 0.10 and reconstructing 0.07 from their snapshots every 5 steps. Scale: the gap between the two tracked
    EMAs. Tolerance 2% of it: the reconstruction's profile from 2 x 8 snapshots differs from the target's by 1.2%
    of its mass in L1 (which bounds the error by 1.2% of the spread of the weights over the last steps, of the
    order of that gap); measured 0.4%, at 2e-6, well above float32 rounding."""
    rebuilt, _ = power_run(tmp_path / "a", 40, lr=1e-2, ema_stds=(0.05, 0.10), ema_snapshot_every=5, posthoc_std=0.07)
    direct, _ = power_run(tmp_path / "b", 40, lr=1e-2, ema_stds=(0.07,))
    emas = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["ema"]["emas"]
    gap = (flat(emas[0]) - flat(emas[1])).abs().max()
    error = (flat(rebuilt.model.state_dict()) - flat(direct.model.state_dict())).abs().max()
    assert error < 0.02 * gap
    assert torch.equal(flat(posthoc_ema(tmp_path / "a", 0.07)), flat(rebuilt.model.state_dict()))
    # without posthoc_std the run returns the EMA of the first std
    first, _ = power_run(tmp_path / "c", 40, lr=1e-2, ema_stds=(0.05, 0.10), ema_snapshot_every=5)
    assert torch.equal(flat(first.model.state_dict()), flat(emas[0]))


def test_a_damaged_or_missing_snapshot_is_named(tmp_path):
    power_run(tmp_path, 10, ema_stds=(0.05, 0.10), ema_snapshot_every=5)
    assert posthoc_ema(tmp_path, 0.08, 10).keys() == build_model("denoiser", NET, (2,)).state_dict().keys()
    snapshot_path(tmp_path, 5).write_bytes(b"not a snapshot")
    with pytest.raises(CheckpointError, match="ema-000000005.pt"):
        posthoc_ema(tmp_path, 0.08, 10)
    snapshot_path(tmp_path, 5).unlink()
    with pytest.raises(FileNotFoundError, match="ema-000000005.pt"):
        posthoc_ema(tmp_path, 0.08, 10, steps=[5, 10])


def test_a_checkpoint_of_other_stds_is_refused():
    ema = PowerFunctionEMA(nn.Linear(2, 2), (0.05, 0.10))
    with pytest.raises(ValueError, match=r"state tracks stds \[0.05, 0.1\], this EMA \[0.05, 0.2\]"):
        PowerFunctionEMA(nn.Linear(2, 2), (0.05, 0.20)).load_state_dict(ema.state_dict())


@pytest.mark.parametrize("values,field,words", [
    ({"ema_stds": (0.05, 0.3)}, "ema_stds.1", "less than 0.2886"),
    ({"ema_stds": (0.0,)}, "ema_stds.0", "greater than 0"),
    ({"ema_stds": (0.05, 0.05)}, "ema_stds", "distinct"),
    ({"ema_snapshot_every": 0, "ema_stds": (0.05,)}, "ema_snapshot_every", "greater than or equal to 1"),
    ({"ema_snapshot_every": 10}, "ema_snapshot_every", "needs ema_stds"),
    ({"posthoc_std": 0.5, "ema_stds": (0.05,), "ema_snapshot_every": 10}, "posthoc_std", "less than 0.2886"),
    ({"posthoc_std": 0.07, "ema_stds": (0.05,)}, "posthoc_std", "needs ema_stds and ema_snapshot_every"),
    ({"posthoc_std": 0.07, "ema_stds": (0.05,), "ema_snapshot_every": 4, "eval_every": 10}, "eval_every",
     "multiple of ema_snapshot_every"),
])
def test_bad_ema_settings_are_refused_naming_the_field(values, field, words):
    with pytest.raises(ValidationError) as info:
        TrainConfig(**values)
    assert field in str(info.value) and words in str(info.value)
    # in a pipeline config the section is named too
    with pytest.raises(ValidationError) as info:
        PipelineConfig.model_validate({"midtrain": {"train": {k: list(v) if isinstance(v, tuple) else v
                                                               for k, v in values.items()}}})
    assert "midtrain.train" in str(info.value) and field in str(info.value)
