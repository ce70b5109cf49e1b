"""Decreasing noise-level grids ``sigma_max = t_0 > t_1 > ... > t_N`` (``(N + 1,)`` float64 tensors)."""

import torch


def karras_grid(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                to_zero: bool = False) -> torch.Tensor:
    """EDM's grid, uniform in sigma^(1/rho); ``to_zero`` appends sigma = 0 (one more step)."""
    i = torch.arange(steps + 1, dtype=torch.float64) / max(steps, 1)
    grid = (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([grid, grid.new_zeros(1)]) if to_zero else grid


def log_uniform_grid(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                     to_zero: bool = False) -> torch.Tensor:
    """Uniform in log sigma (DPM-Solver's logSNR grid); ``to_zero`` appends sigma = 0."""
    grid = torch.exp(torch.linspace(torch.log(torch.tensor(sigma_max, dtype=torch.float64)),
                                    torch.log(torch.tensor(sigma_min, dtype=torch.float64)), steps + 1))
    return torch.cat([grid, grid.new_zeros(1)]) if to_zero else grid


def make_grid(cfg) -> torch.Tensor:
    """The grid of a ``SolverConfig``: ``cfg.steps`` steps (plus one to zero when ``cfg.to_zero``)."""
    if cfg.grid == "karras":
        return karras_grid(cfg.steps, cfg.sigma_min, cfg.sigma_max, cfg.rho, cfg.to_zero)
    return log_uniform_grid(cfg.steps, cfg.sigma_min, cfg.sigma_max, cfg.to_zero)
