"""Distances between point clouds ``(N, D)`` (2-D synthetic data), and the error against the exact flow map.

Both distances are between the two EMPIRICAL distributions, so they are exactly 0 for identical sample sets
and need no density estimate. Computations run in float64.
"""

from __future__ import annotations

import torch


def _as_points(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x).detach().cpu().to(torch.float64)
    if x.ndim != 2:
        raise ValueError(f"expected points of shape (N, D), got {tuple(x.shape)}")
    return x


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, num_projections: int = 512, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance ``sqrt(mean_theta W_2^2(a . theta, b . theta))``.

    ``a: (N, D)``, ``b: (M, D)``; ``num_projections`` random unit directions drawn from ``seed`` (the same
    directions on every call). Each 1-D W_2 is integrated exactly between the two empirical quantile
    functions, so ``N != M`` is allowed.
    """
    a, b = _as_points(a), _as_points(b)
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(a.shape[1], num_projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    qa, qb = (a @ theta).sort(dim=0).values, (b @ theta).sort(dim=0).values  # (N, P), (M, P)
    n, m = len(qa), len(qb)
    # Both quantile functions are step functions, constant between the breakpoints k/n and l/m.
    edges = torch.cat([torch.arange(n + 1, dtype=torch.float64) / n, torch.arange(m + 1, dtype=torch.float64) / m])
    edges = edges.unique(sorted=True)
    mids, widths = (edges[1:] + edges[:-1]) / 2, edges[1:] - edges[:-1]
    ia = (mids * n).floor().long().clamp(max=n - 1)
    ib = (mids * m).floor().long().clamp(max=m - 1)
    w2_squared = (widths[:, None] * (qa[ia] - qb[ib]) ** 2).sum(0)  # (P,)
    return float(w2_squared.mean().sqrt())


def _mean_distance(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """``mean_{i, j} ||a_i - b_j||`` over all pairs, ``chunk`` rows of ``a`` at a time (bounded memory)."""
    total = sum(torch.cdist(a[i:i + chunk], b).sum() for i in range(0, len(a), chunk))
    return total / (len(a) * len(b))


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` between the empirical measures of ``a: (N, D)``
    and ``b: (M, D)``.

    This is the squared form (Szekely & Rizzo); it is >= 0 and 0 only when the two point sets coincide as
    distributions.
    """
    a, b = _as_points(a), _as_points(b)
    e = 2 * _mean_distance(a, b) - _mean_distance(a, a) - _mean_distance(b, b)
    return max(float(e), 0.0)  # clamps float64 round-off around an exact 0


def flow_map_error(pred: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean l2 error ``mean_i ||pred_i - exact_i||`` of a predicted flow map against the exact one, ``(N, 2)`` each."""
    pred, exact = torch.as_tensor(pred).detach().cpu().double(), torch.as_tensor(exact).detach().cpu().double()
    if pred.shape != exact.shape:
        raise ValueError(f"shapes differ: {tuple(pred.shape)} vs {tuple(exact.shape)}")
    return float((pred - exact).flatten(1).norm(dim=1).mean())
