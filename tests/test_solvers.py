import functools
import math

import pytest
import torch

from cmt_core.config import SolverConfig
from cmt_core.data.synthetic import Checkerboard, GaussianMixture
from cmt_core.solvers import function_evaluations, solve, solve_config
from cmt_core.time_grids import karras_grid, log_uniform_grid


@functools.lru_cache
def start_and_reference(distribution):
    x = 80 * torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return x, solve(distribution.denoise, x, karras_grid(512, 0.05, 80.0), "dpm3m")[:, -1]


def measured_order(name: str, distribution) -> float:
    x, reference = start_and_reference(distribution)
    errors = [(solve(distribution.denoise, x, karras_grid(n, 0.05, 80.0), name)[:, -1] - reference).norm(dim=1).mean()
              for n in (16, 32, 64)]
    return math.log2(errors[1] / errors[2])


def fitted_order(steps, errors) -> float:
    """Minus the least-squares slope of log error against log steps."""
    x, y = torch.tensor(steps, dtype=torch.float64).log(), torch.tensor(errors, dtype=torch.float64).log()
    return float(-((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())


GMM, CHECKER = GaussianMixture(8, 2.0, 0.3), Checkerboard()
MULTISTEP = [("dpm2m", {}), ("dpm2m_taylor", {}), ("dpm3m", {}), ("dpm3m", {"lower_order_final": True}),
             ("dpm3m_lu", {"lower_order_final": True})]
MULTISTEP_IDS = ["dpm2m", "dpm2m_taylor", "dpm3m", "dpm3m-lower_order_final", "dpm3m_lu-lower_order_final"]


@pytest.mark.parametrize("distribution", [GMM, CHECKER], ids=["gmm", "checker"])
@pytest.mark.parametrize("name,order", [("euler", 1.0), ("heun", 2.0), ("dpm2m", 2.0), ("dpm2m_taylor", 2.0)])
def test_solver_convergence_order_on_exact_teacher(name, order, distribution):
    assert measured_order(name, distribution) == pytest.approx(order, abs=0.3)


@functools.lru_cache
def mixture_start_and_reference():
    x = 80 * torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return x, solve(GMM.denoise, x, log_uniform_grid(4096), "heun")[:, -1]  # error ~1e-6, far below the fitted ones


def mixture_errors(name: str, steps: tuple[int, ...]) -> list[float]:
    """Mean endpoint error of ``name`` on the mixture, 80 -> 0.002 on log-uniform grids, against a fine Heun solve."""
    x, reference = mixture_start_and_reference()
    return [(solve(GMM.denoise, x, log_uniform_grid(n), name)[:, -1] - reference).norm(dim=1).mean().item()
            for n in steps]


@pytest.mark.parametrize("name", ["dpm2m", "dpm2m_taylor"])
def test_dpm2m_is_second_order_on_the_mixture(name):
    steps = (64, 128, 256)
    assert fitted_order(steps, mixture_errors(name, steps)) == pytest.approx(2.0, abs=0.2)


def test_dpm3m_is_third_order_on_the_mixture():
    steps = (64, 128, 256)
    assert fitted_order(steps, mixture_errors("dpm3m", steps)) == pytest.approx(3.0, abs=0.2)  # measured 3.03


def test_dpm3m_lu_is_second_order_asymptotically_as_lu_et_al_code_writes_it():
    """DPM-Solver's released third-order multistep update (the reference's) weights the second divided difference
    D2 ~ h^2 D''/2 by phi_3, where the Taylor expansion of the integral asks for 2 phi_3: each step errs by
    ~h^3 D''/12, so past the coarse grids it converges at second order, with a smaller constant than 2M (and, at the
    recipes' 16 steps, a smaller error than the third-order update: 7.8e-3 vs 2.7e-2 on this mixture)."""
    steps = (64, 128, 256)
    errors = mixture_errors("dpm3m_lu", steps)
    assert fitted_order(steps, errors) == pytest.approx(2.0, abs=0.2)  # measured 1.87
    assert errors[-1] < 0.5 * mixture_errors("dpm2m", steps)[-1]


def test_standard_dpm2m_is_more_accurate_than_the_taylor_form_at_16_steps():
    mixture = GaussianMixture()
    x = 80 * torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    reference = solve(mixture.denoise, x, log_uniform_grid(2048), "heun")[:, -1]
    error = {name: (solve(mixture.denoise, x, log_uniform_grid(16), name)[:, -1] - reference).norm(dim=1).mean()
             for name in ("dpm2m", "dpm2m_taylor")}
    assert error["dpm2m"] < 0.8 * error["dpm2m_taylor"]  # measured 2.5e-2 vs 3.5e-2


def test_dpm3m_beats_dpm2m_once_the_steps_are_fine():
    errors = {name: mixture_errors(name, (128,))[0] for name in ("dpm2m", "dpm3m")}
    assert errors["dpm3m"] < 0.1 * errors["dpm2m"]  # measured 4.4e-5 vs 6.0e-4


# --- closed form: data N(0, S^2 I), D(x, t) = S^2 / (S^2 + t^2) x, x(s) = x(t) sqrt(S^2 + s^2) / sqrt(S^2 + t^2) ---

S = 0.5


def gaussian_denoiser(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
    return (S**2 / (S**2 + t**2))[:, None] * x


def gaussian_flow(x_T: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The exact states ``(B, N + 1, 2)`` on ``grid`` from ``x_T`` at ``grid[0]``."""
    return x_T[:, None] * (torch.sqrt(S**2 + grid**2) / torch.sqrt(S**2 + grid[0] ** 2))[None, :, None]


@pytest.mark.parametrize("name,options", MULTISTEP, ids=MULTISTEP_IDS)
def test_multistep_solvers_follow_the_closed_form_gaussian_flow(name, options):
    x = 80 * torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grid = log_uniform_grid(16)
    states, exact = solve(gaussian_denoiser, x, grid, name, **options), gaussian_flow(x, grid)
    assert ((states - exact).norm(dim=2) / exact.norm(dim=2)).max() < 0.05  # measured 2.9e-2 (2M) .. 4.9e-2 (taylor)
    steps = (64, 128, 256)
    errors = [(solve(gaussian_denoiser, x, log_uniform_grid(n), name, **options)[:, -1]
               - gaussian_flow(x, log_uniform_grid(n))[:, -1]).norm(dim=1).mean() for n in steps]
    if name == "dpm3m":
        assert fitted_order(steps, errors) > 2.8  # measured 4.2-4.3 here: at least third order
    else:
        assert fitted_order(steps, errors) == pytest.approx(2.0, abs=0.2)  # measured 1.99-2.06


# --- the updates themselves, written from Lu et al. 2022 in Newton divided differences over lambda = -ln t ---

def lu_et_al_update(x, times, denoised, taylor=False, lu_code=False):
    """x_{i+1} from x_i: ``times = (t_{i+1}, t_i, t_{i-1}, ...)``, ``denoised = (D_i, D_{i-1}, ...)``; the order is
    ``len(denoised)``. ``taylor``: DPM-Solver's "taylor" second-order update; ``lu_code``: its code's third-order
    weight phi_3 on ``h^2 D[.,.,.]`` where the integral of the quadratic in lambda asks for 2 phi_3."""
    lam = [-math.log(t) for t in times]
    h, e = lam[0] - lam[1], math.expm1(-lam[0] + lam[1])
    x_next = times[0] / times[1] * x - e * denoised[0]
    if len(denoised) == 1:
        return x_next
    slope = (denoised[0] - denoised[1]) / (lam[1] - lam[2])  # D[lambda_i, lambda_{i-1}]
    phi_2 = e / h + 1
    if len(denoised) == 2:
        return x_next + (phi_2 * h * slope if taylor else -e / 2 * h * slope)
    curvature = (slope - (denoised[1] - denoised[2]) / (lam[2] - lam[3])) / (lam[1] - lam[3])
    phi_3 = (1 if lu_code else 2) * (phi_2 / h - 0.5)
    return x_next + phi_2 * h * (slope + (lam[1] - lam[2]) * curvature) - phi_3 * h**2 * curvature


def expected_states(states, grid, orders, taylor=False, lu_code=False):
    """Each state recomputed from the solver's previous states with the given per-step orders."""
    denoised = [GMM.denoise(states[:, k], grid[k].expand(len(states))) for k in range(len(grid) - 1)]
    out = [states[:, 0]]
    for k, order in enumerate(orders):
        times = [float(grid[k + 1])] + [float(grid[k - j]) for j in range(order)]
        out.append(lu_et_al_update(states[:, k], times, [denoised[k - j] for j in range(order)], taylor,
                                   lu_code))
    return torch.stack(out, dim=1)


UNEVEN = torch.tensor([10.0, 4.0, 1.5, 0.4, 0.05], dtype=torch.float64)  # r != 1, so the ratios matter


@pytest.mark.parametrize("name,options,grid,orders", [
    ("dpm2m", {}, UNEVEN, [1, 2, 2, 2]),
    ("dpm2m_taylor", {}, UNEVEN, [1, 2, 2, 2]),
    ("dpm3m", {}, UNEVEN, [1, 2, 3, 3]),
    ("dpm3m_lu", {}, UNEVEN, [1, 2, 3, 3]),
    ("dpm2m", {"lower_order_final": True}, log_uniform_grid(16), [1] + [2] * 14 + [1]),
    ("dpm3m", {"lower_order_final": True}, log_uniform_grid(16), [1, 2] + [3] * 12 + [2, 1]),
    ("dpm3m_lu", {"lower_order_final": True}, log_uniform_grid(16), [1, 2] + [3] * 12 + [2, 1]),
], ids=["dpm2m", "dpm2m_taylor", "dpm3m", "dpm3m_lu", "dpm2m-lower_order_final", "dpm3m-lower_order_final",
        "dpm3m_lu-lower_order_final"])
def test_multistep_steps_are_lu_et_al_updates_of_the_stated_orders(name, options, grid, orders):
    x = grid[0] * torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    states = solve(GMM.denoise, x, grid, name, **options)
    expected = expected_states(states, grid, orders, taylor=name.endswith("taylor"), lu_code=name.endswith("_lu"))
    torch.testing.assert_close(states, expected, rtol=1e-10, atol=1e-10)


def test_solve_config_honours_lower_order_final():
    x = 80 * torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    cfg = SolverConfig(name="dpm3m", steps=16, lower_order_final=True)
    assert torch.equal(solve_config(GMM.denoise, x, cfg), solve(GMM.denoise, x, log_uniform_grid(16), "dpm3m",
                                                                 lower_order_final=True))
    assert not torch.equal(solve_config(GMM.denoise, x, cfg), solve_config(GMM.denoise, x, SolverConfig(name="dpm3m")))


def test_an_option_the_solver_does_not_take_is_an_error():
    with pytest.raises(ValueError, match="lower_order_final"):
        solve_config(GMM.denoise, torch.zeros(1, 2), SolverConfig(name="heun", lower_order_final=True))


def test_trajectory_layout_and_nfe():
    gmm = GaussianMixture()
    x = 80 * torch.randn(4, 2, dtype=torch.float64)
    grid = karras_grid(18, to_zero=True)
    traj = solve(gmm.denoise, x, grid, "heun")
    assert traj.shape == (4, 19, 2) and grid[-1] == 0 and float(grid[-2]) == pytest.approx(0.002)
    assert torch.equal(traj[:, 0], x)
    assert function_evaluations("heun", grid) == 35
    assert function_evaluations("dpm2m", log_uniform_grid(16)) == 16


def test_per_sample_grid_matches_shared_grid():
    gmm = GaussianMixture()
    x = 5 * torch.randn(6, 2, dtype=torch.float64)
    t, r = torch.full((6,), 5.0, dtype=torch.float64), torch.full((6,), 1.0, dtype=torch.float64)
    for name in ("euler", "heun", "dpm2m"):
        shared = solve(gmm.denoise, x, torch.tensor([5.0, 1.0], dtype=torch.float64), name)
        per_sample = solve(gmm.denoise, x, torch.stack([t, r]), name)
        assert torch.allclose(shared, per_sample)


def test_unknown_solver_is_named():
    with pytest.raises(ValueError, match="rk4"):
        solve(GaussianMixture().denoise, torch.zeros(1, 2), log_uniform_grid(2), "rk4")


def test_lower_order_final_on_a_solver_without_it_is_refused_naming_the_field():
    from pydantic import ValidationError

    from cmt_core.config import SolverConfig

    with pytest.raises(ValidationError, match="lower_order_final=true needs a multistep solver"):
        SolverConfig(name="heun", lower_order_final=True)
    assert SolverConfig(name="dpm3m", lower_order_final=True).lower_order_final
