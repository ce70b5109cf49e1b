import functools
import math

import pytest
import torch

from cmt_core.data.synthetic import Checkerboard, GaussianMixture
from cmt_core.solvers import function_evaluations, solve
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


GMM, CHECKER = GaussianMixture(8, 2.0, 0.3), Checkerboard()


@pytest.mark.parametrize("distribution", [GMM, CHECKER], ids=["gmm", "checker"])
@pytest.mark.parametrize("name,order", [("euler", 1.0), ("heun", 2.0), ("dpm2m", 2.0)])
def test_solver_convergence_order_on_exact_teacher(name, order, distribution):
    assert measured_order(name, distribution) == pytest.approx(order, abs=0.3)


def test_dpm3m_beats_dpm2m_at_equal_steps():
    x, ref = start_and_reference(GMM)
    grid = karras_grid(24, 0.05, 80.0)
    err = {n: (solve(GMM.denoise, x, grid, n)[:, -1] - ref).norm(dim=1).mean() for n in ("dpm2m", "dpm3m")}
    assert err["dpm3m"] < 0.5 * err["dpm2m"]


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
