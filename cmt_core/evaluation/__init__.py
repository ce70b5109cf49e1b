"""Evaluation of the teacher and the few-step models.

* ``Evaluator(data, eval_cfg, cache_dir).score(samples)``: metrics against the held-out split, named after the
  feature space they use (``FID (clean)`` only with real Inception weights; ``FD-digits``, ``FD-pixels`` otherwise);
  ``floor()``: what real data scores.
* ``frechet``: Frechet distance via clean-fid, with cached reference statistics.
* ``reference``: image sets (PNG folders, ``arr_0`` npz) and reference statistics (mu/sigma npz, or computed from
  images and cached) read from files: ``cmt fid`` and ``eval.reference_stats``.
* ``features``: the extractors (``inception``, ``digits_classifier``, ``pixels``) and ``feature_extractor``.
* ``distances_2d``: sliced Wasserstein, energy distance and flow-map error for 2-D data.
* ``report``: ``write_report`` (report.md, metrics.json, PNG figures) and ``png_data_url``.
* ``scoring``: ``Scorer``, a model's metrics from fixed noises (during training and in the table).
* ``table``: ``results_table``, the run's results table and report from models handed in by the stage.

clean-fid and torchvision (the ``[fid]`` extra) are imported only when a Frechet distance or an image grid
is computed.
"""

from cmt_core.evaluation.digits_classifier import DigitsClassifierFeatures, load_digits_split
from cmt_core.evaluation.distances_2d import energy_distance, flow_map_error, sliced_wasserstein
from cmt_core.evaluation.evaluator import Evaluator
from cmt_core.evaluation.features import extract_features, feature_extractor
from cmt_core.evaluation.frechet import cached_stats, feature_stats, frechet_distance, frechet_distance_from_stats
from cmt_core.evaluation.inception import InceptionFeatures
from cmt_core.evaluation.pixels import PixelFeatures
from cmt_core.evaluation.report import png_data_url, write_report

__all__ = [
    "DigitsClassifierFeatures", "Evaluator", "InceptionFeatures", "PixelFeatures", "cached_stats",
    "energy_distance", "extract_features", "feature_extractor", "feature_stats", "flow_map_error",
    "frechet_distance", "frechet_distance_from_stats", "load_digits_split", "png_data_url",
    "sliced_wasserstein", "write_report",
]
