"""Teachers that pass validation and their probe but fail later: the stages must not publish what they produce."""

import torch

from cmt_core.data.synthetic import GaussianMixture


class NaNAtHighNoise(torch.nn.Module):
    """The exact 2-D mixture denoiser, except that it answers NaN above sigma = 10 (the probe asks at sigma = 1)."""

    def __init__(self):
        super().__init__()
        self.mixture = GaussianMixture()

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out = self.mixture.denoise(x.double(), sigma.double()).to(x.dtype)
        return torch.where((sigma > 10)[:, None], torch.full_like(out, float("nan")), out)


def nan_at_high_noise() -> torch.nn.Module:
    return NaNAtHighNoise()
