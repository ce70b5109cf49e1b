"""2-D synthetic distributions whose optimal denoiser E[x_0 | x_t = x] is closed-form.

``sample(n, generator) -> (n, 2)``; ``denoise(x: (B, 2), t: (B,)) -> (B, 2)`` is exact, so the true
probability-flow ODE (and its flow map, by solving it finely) is known for tests and metrics.
"""

from __future__ import annotations

import math

import torch


class GaussianMixture:
    """Equal-weight isotropic Gaussians: means on a circle of ``radius``, std ``std``.

    For x_t = x_0 + t eps, component k is N(mu_k, (std^2 + t^2) I); the posterior mean is
    sum_k w_k(x) (mu_k + std^2 / (std^2 + t^2) (x - mu_k)) with softmax responsibilities w_k.
    """

    def __init__(self, num_modes: int = 8, radius: float = 2.0, std: float = 0.1):
        angles = 2 * math.pi * torch.arange(num_modes, dtype=torch.float64) / num_modes
        self.means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
        self.std = std
        self.sample_shape = (2,)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.randint(len(self.means), (n,), generator=generator)
        return (self.means[k] + self.std * torch.randn(n, 2, generator=generator, dtype=torch.float64)).float()

    def denoise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        mu = self.means.to(x.device, x.dtype)
        var = self.std**2 + t.to(x.dtype)[:, None] ** 2  # (B, 1)
        diff = x[:, None, :] - mu[None]  # (B, K, 2)
        logits = -(diff**2).sum(-1) / (2 * var)
        w = torch.softmax(logits, dim=1)[..., None]
        return (w * (mu[None] + (self.std**2 / var)[:, :, None] * diff)).sum(1)


class Checkerboard:
    """Uniform on the black cells of a ``cells x cells`` board covering [-2, 2]^2.

    For a box [a, b] per axis, p(x_0 | x_t) is a Gaussian truncated to the box, whose mean per axis is
    x + t (phi(alpha) - phi(beta)) / (Phi(beta) - Phi(alpha)), alpha = (a - x)/t, beta = (b - x)/t; the
    cells are weighted by their posterior mass prod (Phi(beta) - Phi(alpha)).
    """

    def __init__(self, cells: int = 4, extent: float = 2.0):
        edges = torch.linspace(-extent, extent, cells + 1, dtype=torch.float64)
        boxes = [(edges[i], edges[i + 1], edges[j], edges[j + 1])
                 for i in range(cells) for j in range(cells) if (i + j) % 2 == 0]
        self.boxes = torch.tensor(boxes, dtype=torch.float64)  # (K, 4): x0, x1, y0, y1
        self.sample_shape = (2,)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.randint(len(self.boxes), (n,), generator=generator)
        u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        b = self.boxes[k]
        x = b[:, 0] + u[:, 0] * (b[:, 1] - b[:, 0])
        y = b[:, 2] + u[:, 1] * (b[:, 3] - b[:, 2])
        return torch.stack([x, y], 1).float()

    def denoise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        normal = torch.distributions.Normal(0.0, 1.0)
        boxes = self.boxes.to(x.device, torch.float64)
        xd, td = x.double()[:, None, :], t.double().clamp(min=1e-12)[:, None, None]  # (B, 1, 2), (B, 1, 1)
        lo, hi = boxes[None, :, 0::2], boxes[None, :, 1::2]  # (1, K, 2)
        alpha, beta = (lo - xd) / td, (hi - xd) / td
        mass = (normal.cdf(beta) - normal.cdf(alpha)).clamp(min=1e-300)
        pdf = lambda z: torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)  # noqa: E731
        mean = xd + td * (pdf(alpha) - pdf(beta)) / mass
        mean = torch.minimum(torch.maximum(mean, lo), hi)  # guards round-off far outside a cell
        log_w = mass.log().sum(-1)  # (B, K)
        w = torch.softmax(log_w, dim=1)[..., None]
        return (w * mean).sum(1).to(x.dtype)
