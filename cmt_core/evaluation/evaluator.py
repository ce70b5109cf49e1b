"""Score generated samples against the held-out split: ``Evaluator(data, eval_cfg, cache_dir).score(samples)``.

Samples are scored in the sample space (what an image distance sees: decoded samples, ``cmt_core.encoders``;
the caller decodes model-space samples first). ``eval_cfg`` is an ``EvalConfig`` (num_samples, batch_size, seed,
inception_path, fid_mode).

* Images ``(N, C, H, W)`` in [-1, 1]: the Frechet distance in the feature space of ``feature_extractor``,
  reported under the extractor's name (``FID (clean)``, ``FD-digits`` or ``FD-pixels``). Generated samples are
  clamped to [-1, 1], as saving them as images would. The held-out and training statistics are computed once
  and cached in ``cache_dir`` (keyed by feature space and by a digest of the data).
* 2-D points ``(N, 2)``: ``sliced_wasserstein`` and ``energy_distance`` against ``eval_cfg.num_samples``
  held-out points.

Without a held-out split (``data.heldout_fraction=0``, as the paper's recipes score against every training image,
``fid50k_full``) images are scored against the training split, which ``info()`` says.

``floor()`` is what a perfect generator would score with this many samples: images, held-out vs training split
(none without a held-out split);
2-D, two fresh samples of the data distribution. Every metric is lower-is-better.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from cmt_core.data import Data
from cmt_core.evaluation.distances_2d import energy_distance, sliced_wasserstein
from cmt_core.evaluation.features import extract_features, feature_extractor
from cmt_core.evaluation.frechet import cached_stats, feature_stats, frechet_distance_from_stats

POINT_METRICS = ("sliced_wasserstein", "energy_distance")


def _digest(batches) -> str:
    """sha1 (12 hex digits) of the bytes of consecutive batches: the digest of their concatenation."""
    digest = hashlib.sha1()
    for x in batches:
        digest.update(x.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


class Evaluator:
    """Metrics of generated samples; ``metric_name`` is the primary (lower-is-better) key of ``score``.

    ``data_cfg`` (a ``DataConfig``) gives the train / held-out split the digits classifier must be trained on
    (default: the default split); a mismatch with ``data.heldout`` is an error, since the classifier must not see
    held-out images.
    """

    def __init__(self, data: Data, eval_cfg, cache_dir: str | Path, data_cfg=None,
                 device: str | torch.device = "cpu"):
        self.data, self.cfg = data, eval_cfg
        self.cache_dir = Path(cache_dir)
        self.device = torch.device(device)
        self.is_points = data.is_points
        self.reference_split = "heldout" if len(data.heldout) else "train"  # what samples are scored against
        if self.is_points:
            self.extractor = None
            self.metric_name = POINT_METRICS[0]
            self.reference = getattr(data, self.reference_split).read(slice(0, eval_cfg.num_samples))
            return
        self.extractor = feature_extractor(data_cfg or data.name, eval_cfg, self.cache_dir, self.device)
        held = getattr(self.extractor, "heldout_images", None)
        if held is not None and not (len(held) == len(data.heldout) and torch.equal(held, data.heldout.all())):
            raise ValueError("the digits classifier's held-out split differs from data.heldout: pass the DataConfig "
                             "the data was loaded with as data_cfg")
        self.metric_name = self.extractor.name
        self._stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def features(self, images: torch.Tensor) -> np.ndarray:
        """Features ``(N, D)`` of ``images: (N, C, H, W)`` clamped to [-1, 1], ``eval_cfg.batch_size`` at a time."""
        return extract_features(self.extractor, images.clamp(-1, 1), self.cfg.batch_size)

    def _split_stats(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Feature statistics of a split, read from its data set a batch at a time (cached on disk)."""
        if split not in self._stats:
            images, size = getattr(self.data, split), self.cfg.batch_size
            key = f"{self.extractor.cache_key}_{self.data.name}_{split}{len(images)}_{_digest(images.batches(size))}"
            compute = lambda: extract_features(self.extractor, (b.clamp(-1, 1) for b in images.batches(size)), size)
            self._stats[split] = cached_stats(self.cache_dir, key, compute)
        return self._stats[split]

    def _check_shape(self, samples: torch.Tensor) -> None:
        if tuple(samples.shape[1:]) != self.data.sample_shape:
            raise ValueError(f"samples of shape {tuple(samples.shape)} do not match the data's "
                             f"(N, {', '.join(map(str, self.data.sample_shape))})")

    def _point_metrics(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
        return {"sliced_wasserstein": sliced_wasserstein(a, b, seed=self.cfg.seed),
                "energy_distance": energy_distance(a, b)}

    def score(self, samples: torch.Tensor) -> dict[str, float]:
        """Metrics of ``samples`` (``(N, *sample_shape)``) against the held-out split, e.g. ``{"FD-digits": 3.2}``."""
        self._check_shape(samples)
        if self.is_points:
            return self._point_metrics(samples, self.reference)
        stats = feature_stats(self.features(samples))
        return {self.metric_name: frechet_distance_from_stats(stats, self._split_stats(self.reference_split))}

    def floor(self) -> dict[str, float]:
        """The same metrics for real data: held-out vs training split (images) or two fresh samples (2-D)."""
        if not self.is_points:
            if self.reference_split != "heldout":
                return {}
            fd = frechet_distance_from_stats(self._split_stats("heldout"), self._split_stats("train"))
            return {self.metric_name: fd}
        n = len(self.reference)
        if self.data.distribution is None:
            return self._point_metrics(self.data.train.read(slice(0, n)), self.reference)
        g = torch.Generator().manual_seed(self.cfg.seed)
        return self._point_metrics(self.data.distribution.sample(n, g), self.data.distribution.sample(n, g))

    def info(self) -> dict:
        """What the numbers mean: extractor / metrics, reference size, samples scored, device."""
        base = {"num_samples": self.cfg.num_samples, "device": str(self.device),
                "reference": f"held-out split ({len(self.reference)} samples)" if self.is_points else
                f"{self.reference_split.replace('heldout', 'held-out')} split "
                f"({len(getattr(self.data, self.reference_split))} samples)"}
        if self.is_points:
            return {"metrics": list(POINT_METRICS), **base}
        return {**self.extractor.info(), **base}
