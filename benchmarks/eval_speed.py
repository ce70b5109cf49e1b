"""Speed of the offline digits evaluation, and the accuracy of the classifier that defines its feature space.

Measures, on the embedded digits data:

* ``seconds_per_1000_samples``: wall time to generate 1000 samples AND score them with ``Evaluator.score``
  (digits-classifier features in batches + Frechet distance against the cached held-out statistics); median
  of ``--repeats`` runs. The generator is a cheap stand-in, not a trained model: held-out images drawn with
  replacement plus Gaussian noise (std 0.1), so the time is that of evaluation, not of a network's sampling.
* ``digits_classifier_heldout_accuracy``: the classifier trained from scratch in a fresh cache directory
  (its training time and the first reference-statistics time are reported too).

Writes ``benchmarks/results/eval.json``. Usage: ``python benchmarks/eval_speed.py [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cmt_core.config import DataConfig, EvalConfig
from cmt_core.data import load_data
from cmt_core.evaluation import DigitsClassifierFeatures, Evaluator

NUM_SAMPLES = 1000


def stand_in_generator(heldout: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``(n, C, H, W)``: held-out images drawn with replacement, plus N(0, 0.1^2) noise."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(heldout), (n,), generator=g)
    return heldout[idx] + 0.1 * torch.randn((n, *heldout.shape[1:]), generator=g)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval.json")
    args = parser.parse_args()

    data_cfg = DataConfig(name="digits")
    data = load_data(data_cfg)
    with tempfile.TemporaryDirectory() as cache_dir:
        t0 = time.perf_counter()
        classifier = DigitsClassifierFeatures(cache_dir, data_cfg.seed, data_cfg.heldout_fraction)
        train_seconds = time.perf_counter() - t0
        evaluator = Evaluator(data, EvalConfig(num_samples=NUM_SAMPLES), cache_dir, data_cfg)
        t0 = time.perf_counter()
        floor = evaluator.floor()  # held-out and train statistics, computed once and cached
        reference_seconds = time.perf_counter() - t0
        times, scores = [], []
        for seed in range(args.repeats):
            t0 = time.perf_counter()
            samples = stand_in_generator(data.heldout.all(), NUM_SAMPLES, seed)
            scores.append(evaluator.score(samples)[evaluator.metric_name])
            times.append(time.perf_counter() - t0)

    result = {
        "seconds_per_1000_samples": statistics.median(times),
        "seconds_per_1000_samples_all_repeats": times,
        "digits_classifier_heldout_accuracy": classifier.heldout_accuracy,
        "digits_classifier_train_seconds": train_seconds,
        "reference_stats_seconds": reference_seconds,
        "metric": evaluator.metric_name,
        "stand_in_score": statistics.median(scores),
        "data_floor": floor[evaluator.metric_name],
        "measures": "generate 1000 stand-in samples (held-out images + N(0, 0.1^2) noise) and Evaluator.score them",
        "machine": {
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": "cpu",
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "load_average_1min": os.getloadavg()[0],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
