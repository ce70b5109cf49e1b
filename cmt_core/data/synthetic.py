"""2-D synthetic distributions whose optimal denoiser E[x_0 | x_t = x] is closed-form.

``sample(n, generator) -> (n, 2)``; ``denoise(x: (B, 2), t: (B,), cond=None) -> (B, 2)`` is exact (a denoiser
with the pipeline's signature, ``cmt_core.conditioning``), so the true
probability-flow ODE (and its flow map, by solving it finely) is known for tests and metrics.

A ``GaussianMixture`` with ``num_classes > 0`` is also a class-conditional distribution: its modes are dealt to
the classes in turn (mode k belongs to class k mod num_classes), p(x | c) is the mixture of class c's modes, and
``denoise(x, t, {"class_labels": one-hot rows})`` is the exact conditional posterior mean E[x_0 | x_t = x, c] (an
all-zero label row: the unconditional one), so conditional rollouts can be checked against a closed form.
"""

from __future__ import annotations

import math

import torch

from cmt_core.conditioning import CLASS_LABELS, Cond, check_known


class GaussianMixture:
    """Equal-weight isotropic Gaussians: means on a circle of ``radius``, std ``std``.

    For x_t = x_0 + t eps, component k is N(mu_k, (std^2 + t^2) I); the posterior mean is
    sum_k w_k(x) (mu_k + std^2 / (std^2 + t^2) (x - mu_k)) with softmax responsibilities w_k.
    """

    def __init__(self, num_modes: int = 8, radius: float = 2.0, std: float = 0.1, num_classes: int = 0):
        if not 0 <= num_classes <= num_modes:
            raise ValueError(f"num_classes must lie in [0, num_modes={num_modes}], got {num_classes}")
        angles = 2 * math.pi * torch.arange(num_modes, dtype=torch.float64) / num_modes
        self.means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
        self.std = std
        self.sample_shape = (2,)
        self.num_classes = num_classes
        self.mode_class = torch.arange(num_modes) % max(num_classes, 1)  # (K,): the class of each mode

    def sample_labelled(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` samples ``(n, 2)`` and their classes ``(n,)`` (the same draws as ``sample``)."""
        k = torch.randint(len(self.means), (n,), generator=generator)
        x = (self.means[k] + self.std * torch.randn(n, 2, generator=generator, dtype=torch.float64)).float()
        return x, self.mode_class[k]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.sample_labelled(n, generator)[0]

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        """E[x_0 | x_t = x] (with ``cond["class_labels"]`` ``(B, num_classes)`` one-hot: given each row's class)."""
        check_known(cond, (CLASS_LABELS,) if self.num_classes else (), "this Gaussian mixture's denoiser")
        class_labels = (cond or {}).get(CLASS_LABELS)
        mu = self.means.to(x.device, x.dtype)
        var = self.std**2 + t.to(x.dtype)[:, None] ** 2  # (B, 1)
        diff = x[:, None, :] - mu[None]  # (B, K, 2)
        logits = -(diff**2).sum(-1) / (2 * var)
        if class_labels is not None:
            members = torch.nn.functional.one_hot(self.mode_class, max(self.num_classes, 1)).T.to(x.device, x.dtype)
            allowed = class_labels.to(x.dtype) @ members  # (B, K): 1 for the modes of the row's class
            allowed = torch.where(allowed.sum(1, keepdim=True) > 0, allowed, torch.ones_like(allowed))
            logits = logits.masked_fill(allowed == 0, -math.inf)
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

    num_classes = 0

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        check_known(cond, (), "the checkerboard's denoiser")
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
