"""Score generated samples against the held-out split: ``Evaluator(data, eval_cfg, cache_dir).score(samples)``,
or ``score(samples, labels)`` for samples drawn for classes.

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

With ``reference_stats`` (the evaluation stage passes ``eval.reference_stats``: a mu/sigma ``.npz`` such as EDM's
``fid-refs``, or a folder / ``.npz`` of images, ``cmt_core.evaluation.reference``) the overall distance is measured
against those statistics instead of a split's, and ``floor()`` is the reference split's distance to them;
``info()`` names the file. The per-class metrics keep their splits (statistics have no classes). Training stages
pass none: their checkpoints are chosen against the held-out split, never against the statistics reported.

Conditional samples (image data with classes; ``labels``: the class each sample was drawn for) also get:

* ``<metric_name> per class`` (e.g. ``FD-digits per class``): the mean over classes of the Frechet distance
  between the features of the samples drawn for class c and the reference images of class c (the intra-FID of
  Miyato & Koyama, 2018). The reference of class c is the reference split's class c when every class of that split
  has more images than the features have dimensions (so each class's covariance can be full rank), else the
  training split's class c: on digits (~36 held-out images per class, 64 features) the ~145 training images per
  class. That reference holds the images the classifier and the generator were trained on, so it rewards
  memorising them. Its statistics are cached per class like the splits'. The estimate is noisy and biased upward
  for few images (the FD of two finite samples of one distribution is positive, roughly in proportion to D / n):
  with ``num_samples`` samples, each class has about ``num_samples / num_classes``; classes with fewer than
  ``MIN_SAMPLES_PER_CLASS`` samples are left out of the mean. ``floor(by_class=True)`` gives its scale: held-out
  class c against training class c (digits: ~9 with ~36 images per class, against ~5 for ``FD-digits`` of the
  whole held-out split; the same images with shuffled labels: ~500).
* ``class_accuracy`` (digits only, in percent): how many samples the digits classifier (the one whose features
  ``FD-digits`` uses, trained on the training split only) assigns to the class they were drawn for. Chance is
  100 / num_classes.

2-D points have no per-class metrics: their ``labels`` are not scored; nor are those of data with more than
``MAX_CLASSES_SCORED`` classes (ImageNet's 1,000: 50 samples a class from 50,000 give no meaningful distance in
Inception's 2,048 dimensions, and 1,000 covariance square roots would cost more than the rest of the evaluation),
which report the overall distance only (``scores_by_class``).

``floor()`` is what a perfect generator would score with this many samples: images, held-out vs training split
(none without a held-out split);
2-D, two fresh samples of the data distribution. Every metric is lower-is-better except those in
``HIGHER_IS_BETTER`` (``class_accuracy``).
"""

from __future__ import annotations

import hashlib
import math
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from cmt_core.data import Data
from cmt_core.data.datasets import Dataset
from cmt_core.evaluation.digits_classifier import DigitsClassifierFeatures
from cmt_core.evaluation.distances_2d import energy_distance, sliced_wasserstein
from cmt_core.evaluation.features import extract_features, feature_extractor
from cmt_core.evaluation.frechet import Stats, cached_stats, feature_stats, frechet_distance_from_stats
from cmt_core.evaluation.reference import Reference, reference_stats

POINT_METRICS = ("sliced_wasserstein", "energy_distance")
CLASS_ACCURACY = "class_accuracy"
HIGHER_IS_BETTER = frozenset({CLASS_ACCURACY})  # every other metric is lower-is-better
MIN_SAMPLES_PER_CLASS = 2  # fewer samples of a class have no covariance: the class is left out of the mean
MAX_CLASSES_SCORED = 100  # more classes: no per-class metrics (module docstring)
SPLIT_NAMES = {"heldout": "held-out", "train": "training"}


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
    held-out images. ``classifier``: the digits classifier behind ``class_accuracy`` (None for other data).
    ``reference_stats``: statistics (or images) the overall distance is measured against instead of the reference
    split (module docstring); image data only.
    """

    def __init__(self, data: Data, eval_cfg, cache_dir: str | Path, data_cfg=None,
                 device: str | torch.device = "cpu", reference_stats: str | Path | None = None):
        self.data, self.cfg = data, eval_cfg
        self.cache_dir = Path(cache_dir)
        self.device = torch.device(device)
        self.is_points = data.is_points
        self.reference_split = "heldout" if len(data.heldout) else "train"  # what samples are scored against
        self.reference_path = None if reference_stats is None else Path(reference_stats)
        if self.is_points:
            if self.reference_path is not None:
                raise ValueError(f"reference statistics score images; {data.name!r} is 2-D point data")
            self.extractor = self.classifier = None
            self.metric_name = POINT_METRICS[0]
            self.reference = getattr(data, self.reference_split).read(slice(0, eval_cfg.num_samples))
            return
        self.extractor = feature_extractor(data_cfg or data.name, eval_cfg, self.cache_dir, self.device)
        held = getattr(self.extractor, "heldout_images", None)
        if held is not None and not (len(held) == len(data.heldout) and torch.equal(held, data.heldout.all())):
            raise ValueError("the digits classifier's held-out split differs from data.heldout: pass the DataConfig "
                             "the data was loaded with as data_cfg")
        self.classifier = self.extractor if isinstance(self.extractor, DigitsClassifierFeatures) else None
        self.metric_name = self.extractor.name
        self.per_class_name = f"{self.metric_name} per class"
        self._stats: dict[str, Stats] = {}

    def features(self, images: torch.Tensor) -> np.ndarray:
        """Features ``(N, D)`` of ``images: (N, C, H, W)`` clamped to [-1, 1], ``eval_cfg.batch_size`` at a time."""
        return extract_features(self.extractor, images.clamp(-1, 1), self.cfg.batch_size)

    def _dataset_features(self, images: Dataset) -> np.ndarray:
        """Features ``(len(images), D)`` of a data set's images clamped to [-1, 1], read a batch at a time."""
        size = self.cfg.batch_size
        return extract_features(self.extractor, (b.clamp(-1, 1) for b in images.batches(size)), size)

    def _dataset_stats(self, name: str, images: Dataset) -> Stats:
        """Feature statistics of ``images``; cached in memory under ``name`` and on disk under the feature space,
        the data, ``name``, the size and a digest of the images."""
        if name not in self._stats:
            digest = _digest(images.batches(self.cfg.batch_size))
            key = f"{self.extractor.cache_key}_{self.data.name}_{name}{len(images)}_{digest}"
            self._stats[name] = cached_stats(self.cache_dir, key, lambda: self._dataset_features(images))
        return self._stats[name]

    def _split_stats(self, split: str) -> Stats:
        """Feature statistics of a split (``"heldout"`` or ``"train"``)."""
        return self._dataset_stats(split, getattr(self.data, split))

    @cached_property
    def _reference_file(self) -> Reference:
        """The statistics of ``reference_stats`` in this feature space (images': computed once, cached)."""
        return reference_stats(self.reference_path, "eval.reference_stats", self.extractor, self.data.sample_shape,
                               self.cache_dir, self.cfg.batch_size)

    def _reference_stats(self) -> Stats:
        """What the overall distance is measured against: the ``reference_stats`` file's, else the reference
        split's statistics."""
        if self.reference_path is None:
            return self._split_stats(self.reference_split)
        return self._reference_file.stats

    def _split_labels(self, split: str) -> np.ndarray:
        """Class labels ``(len(split),)`` int64 of a split."""
        return getattr(self.data, split).labels(slice(None)).numpy()

    def _class_stats(self, split: str, c: int) -> Stats:
        """Feature statistics of the images of class ``c`` in a split."""
        rows = np.flatnonzero(self._split_labels(split) == c)
        return self._dataset_stats(f"{split}_class{c}_n", getattr(self.data, split).subset(rows))

    @cached_property
    def class_reference_split(self) -> str:
        """The split whose class-c images are class c's reference (module docstring): the reference split when
        each of its classes has more images than the features have dimensions, else the training split."""
        counts = np.bincount(self._split_labels(self.reference_split), minlength=self.data.num_classes)
        dim = len(self._split_stats(self.reference_split)[0])
        return self.reference_split if counts.min() > dim else "train"

    def _check_shape(self, samples: torch.Tensor) -> None:
        if tuple(samples.shape[1:]) != self.data.sample_shape:
            raise ValueError(f"samples of shape {tuple(samples.shape)} do not match the data's "
                             f"(N, {', '.join(map(str, self.data.sample_shape))})")

    def _check_labels(self, labels: torch.Tensor, n: int) -> np.ndarray:
        """``labels`` as an int64 array ``(n,)``; refuses labels for data without classes, of another shape or
        out of ``[0, num_classes)``."""
        k = self.data.num_classes
        if not k:
            raise ValueError(f"labels were given but the {self.data.name!r} data has no class labels")
        labels = torch.as_tensor(labels)
        if labels.shape != (n,) or labels.dtype != torch.int64:
            raise ValueError(f"labels must be int64 of shape ({n},), got {labels.dtype} {tuple(labels.shape)}")
        if n and not 0 <= int(labels.min()) <= int(labels.max()) < k:
            raise ValueError(f"labels must lie in [0, {k}), got {int(labels.min())}..{int(labels.max())}")
        return labels.cpu().numpy()

    def _point_metrics(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
        return {"sliced_wasserstein": sliced_wasserstein(a, b, seed=self.cfg.seed),
                "energy_distance": energy_distance(a, b)}

    def _class_metrics(self, feats: np.ndarray, labels: np.ndarray, reference_split: str) -> dict[str, float]:
        """The per-class Frechet distance of features ``(N, D)`` of images drawn for ``labels: (N,)`` against
        class c of ``reference_split`` (mean over the classes with ``MIN_SAMPLES_PER_CLASS`` samples; NaN if
        none has) and, with the digits classifier, its ``class_accuracy`` in percent."""
        fds = [frechet_distance_from_stats(feature_stats(feats[labels == c]), self._class_stats(reference_split, c))
               for c in range(self.data.num_classes) if (labels == c).sum() >= MIN_SAMPLES_PER_CLASS]
        out = {self.per_class_name: float(np.mean(fds)) if fds else math.nan}
        if self.classifier is not None:
            out[CLASS_ACCURACY] = 100.0 * float(np.mean(self.classifier.predict(feats) == labels))
        return out

    def score(self, samples: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        """Metrics of ``samples`` (``(N, *sample_shape)``) against the held-out split (or ``reference_stats``), e.g.
        ``{"FD-digits": 3.2}``; with ``labels`` (int64 ``(N,)``, the classes the samples were drawn for; images only)
        also the per-class Frechet distance and, on digits, ``class_accuracy`` (module docstring)."""
        self._check_shape(samples)
        if self.is_points:
            return self._point_metrics(samples, self.reference)
        feats = self.features(samples)
        out = {self.metric_name: frechet_distance_from_stats(feature_stats(feats), self._reference_stats())}
        if labels is not None:
            labels = self._check_labels(labels, len(samples))
            if self.scores_by_class:
                out.update(self._class_metrics(feats, labels, self.class_reference_split))
        return out

    @property
    def scores_by_class(self) -> bool:
        """Whether conditional samples get the per-class metrics: image data with 1 to ``MAX_CLASSES_SCORED``
        classes."""
        return not self.is_points and 0 < self.data.num_classes <= MAX_CLASSES_SCORED

    def floor(self, by_class: bool = False) -> dict[str, float]:
        """The same metrics for real data: held-out vs training split (images; with ``reference_stats``: the
        reference split vs those statistics) or two fresh samples (2-D).

        ``by_class`` (image data with classes): also the class metrics of the held-out images with their labels,
        each class against the training images of that class."""
        if not self.is_points:
            if self.reference_path is None and self.reference_split != "heldout":
                return {}
            against = self._split_stats("train") if self.reference_path is None else self._reference_stats()
            out = {self.metric_name: frechet_distance_from_stats(self._split_stats(self.reference_split), against)}
            if by_class:
                feats = self._dataset_features(self.data.heldout)
                out.update(self._class_metrics(feats, self._split_labels("heldout"), "train"))
            return out
        n = len(self.reference)
        if self.data.distribution is None:
            return self._point_metrics(self.data.train.read(slice(0, n)), self.reference)
        g = torch.Generator().manual_seed(self.cfg.seed)
        return self._point_metrics(self.data.distribution.sample(n, g), self.data.distribution.sample(n, g))

    @property
    def floor_label(self) -> str:
        """The name of ``floor()``'s row in the results table."""
        if self.reference_path is None:
            return "data (held-out vs train)"
        return f"data ({SPLIT_NAMES[self.reference_split]} split vs reference statistics)"

    def info(self, by_class: bool = False) -> dict:
        """What the numbers mean: extractor / metrics, reference (a split and its size, or the ``reference_stats``
        file and what it holds), samples scored, device; ``by_class`` (image data with classes): also what the class
        metrics are."""
        if self.reference_path is not None:
            reference = f"eval.reference_stats {self.reference_path} ({self._reference_file.source})"
        elif self.is_points:
            reference = f"held-out split ({len(self.reference)} samples)"
        else:
            reference = (f"{self.reference_split.replace('heldout', 'held-out')} split "
                         f"({len(getattr(self.data, self.reference_split))} samples)")
        base = {"num_samples": self.cfg.num_samples, "device": str(self.device), "reference": reference}
        if self.is_points:
            return {"metrics": list(POINT_METRICS), **base}
        return {**self.extractor.info(), **base, **(self._class_info() if by_class else {})}

    def _class_info(self) -> dict:
        """What the class metrics are, for ``info(by_class=True)``."""
        split = self.class_reference_split
        counts = np.bincount(self._split_labels(split), minlength=self.data.num_classes)
        out = {self.per_class_name: f"mean over classes of {self.metric_name} between the samples drawn for a class "
                                    f"and the {SPLIT_NAMES[split]} images of that class "
                                    f"({counts.min()}..{counts.max()} per class)"}
        if self.classifier is not None:
            out[CLASS_ACCURACY] = ("percent of samples the digits classifier (trained on the training split) assigns "
                                   "to the class they were drawn for; higher is better")
        return out
