"""Decreasing noise-level grids ``sigma_max = t_0 > t_1 > ... > t_N`` (``(N + 1,)`` float64 tensors)."""

import torch


def karras_grid(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                to_zero: bool = False) -> torch.Tensor:
    """EDM's grid, uniform in sigma^(1/rho), with ``steps`` steps.

    ``to_zero``: the last of the ``steps`` steps goes from sigma_min to 0, as in EDM, where 18 steps are
    18 noise levels plus 0 (35 Heun evaluations)."""
    points = steps if to_zero else steps + 1
    i = torch.arange(points, dtype=torch.float64) / max(points - 1, 1)
    grid = (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([grid, grid.new_zeros(1)]) if to_zero else grid


def log_uniform_grid(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                     to_zero: bool = False) -> torch.Tensor:
    """Uniform in log sigma (DPM-Solver's logSNR grid), ``steps`` steps; ``to_zero``: the last one ends at 0."""
    points = steps if to_zero else steps + 1
    grid = torch.exp(torch.linspace(torch.log(torch.tensor(sigma_max, dtype=torch.float64)),
                                    torch.log(torch.tensor(sigma_min, dtype=torch.float64)), points,
                                    dtype=torch.float64))  # linspace defaults to float32 even between float64 ends
    return torch.cat([grid, grid.new_zeros(1)]) if to_zero else grid


def make_grid(cfg) -> torch.Tensor:
    """The grid of a ``SolverConfig``: ``cfg.steps`` steps, the last one to zero when ``cfg.to_zero``."""
    if cfg.grid == "karras":
        return karras_grid(cfg.steps, cfg.sigma_min, cfg.sigma_max, cfg.rho, cfg.to_zero)
    return log_uniform_grid(cfg.steps, cfg.sigma_min, cfg.sigma_max, cfg.to_zero)
