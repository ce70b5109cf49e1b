"""EDM denoising loss for pre-training the teacher: ln t ~ N(p_mean, p_std^2), weight (t^2 + sd^2) / (t sd)^2."""

import torch

from cmt_core.objectives.distances import mean_squared_error
from cmt_core.preconditioning import bcast


class EDMLoss:
    """``loss(denoiser, {"x": (B, ...), "cond"}, rng) -> (B,)``."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5):
        self.p_mean, self.p_std, self.sigma_data = p_mean, p_std, sigma_data

    def __call__(self, denoiser, batch, rng) -> torch.Tensor:
        y, cond = batch["x"], batch.get("cond")
        t = (self.p_mean + self.p_std * rng.randn()).exp()
        noise = rng.randn(*y.shape[1:])
        weight = (t**2 + self.sigma_data**2) / (t * self.sigma_data) ** 2
        return weight * mean_squared_error(denoiser(y + bcast(t, y) * noise, t, cond=cond), y)
