"""Frechet distance between feature sets, computed by clean-fid's own ``frechet_distance``.

A feature set ``(N, D)`` is summarised by its Gaussian statistics ``mu: (D,)`` and ``sigma: (D, D)``
(``np.mean`` / ``np.cov(rowvar=False)``, exactly as ``cleanfid.fid.fid_from_feats`` does), so a reference set is
reduced once and its statistics cached as ``.npz`` in a directory the caller owns.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

Stats = tuple[np.ndarray, np.ndarray]


def feature_stats(feats: np.ndarray) -> Stats:
    """``feats: (N, D)`` -> ``(mu: (D,), sigma: (D, D))``, computed exactly as ``cleanfid.fid.fid_from_feats`` does."""
    feats = np.asarray(feats)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {feats.shape}")
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def frechet_distance_from_stats(stats_a: Stats, stats_b: Stats) -> float:
    """``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` via ``cleanfid.fid.frechet_distance``."""
    try:
        from cleanfid import fid as cleanfid_fid
    except ImportError as err:
        raise ImportError("Frechet distances need clean-fid: pip install 'cmt[fid]'") from err
    with warnings.catch_warnings():
        # clean-fid 0.1.35 passes sqrtm(disp=False), deprecated (not yet removed) in the SciPy < 1.18 we pin.
        warnings.filterwarnings("ignore", message=".*`disp` argument is deprecated.*", category=DeprecationWarning)
        return float(cleanfid_fid.frechet_distance(stats_a[0], stats_a[1], stats_b[0], stats_b[1]))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between the Gaussians fitted to ``feats_a: (N, D)`` and ``feats_b: (M, D)``."""
    return frechet_distance_from_stats(feature_stats(feats_a), feature_stats(feats_b))


def save_stats(path: str | Path, stats: Stats) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")  # write-then-rename: a killed run leaves no half file
    np.savez(tmp, mu=stats[0], sigma=stats[1])
    tmp.replace(path)


def load_stats(path: str | Path) -> Stats:
    with np.load(path) as f:
        return f["mu"], f["sigma"]


def stats_file(cache_dir: str | Path, key: str) -> Path:
    """Where ``cached_stats`` keeps the statistics cached under ``key``."""
    return Path(cache_dir) / f"fd_stats_{key}.npz"


def cached_stats(cache_dir: str | Path, key: str, compute_feats: Callable[[], np.ndarray]) -> Stats:
    """Statistics stored as ``stats_file(cache_dir, key)``; ``compute_feats() -> (N, D)`` runs only on a miss."""
    path = stats_file(cache_dir, key)
    if path.exists():
        return load_stats(path)
    stats = feature_stats(compute_feats())
    save_stats(path, stats)
    return stats
