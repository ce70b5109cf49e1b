"""Training-time preconditioning of consistency models: the boundary form always, or only at evaluation (ECT).

ECT and the CMT reference train with EDM's scalings (c_skip = sd^2 / (t^2 + sd^2)), so a teacher-initialised
student starts as an exact copy of the teacher, and switch to the boundary form (f(x, sigma_min) = x) only
to evaluate; ``network.consistency_boundary=always`` uses the boundary form in training too. This runs a
preset's mid-training and post-training with both settings and ``--seeds`` training seeds (the teacher and the
rollouts are shared: they do not read the setting) and writes ``benchmarks/results/precond.json``:
``{"preset", "metric_name", "seeds", "settings": {SETTING: {"mid_1step", "mid_2step", "post_1step",
"post_2step": {"mean", "std", "per_seed"}}}, "seconds"}``.

    .venv/bin/python benchmarks/precond.py                 # digits, 3 seeds (about 20 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from cmt_core.pipeline import run_pipeline
from cmt_core.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "precond.json"
SETTINGS = ("always", "evaluation")
ROWS = {"mid_1step": "midtrain_1step", "mid_2step": "midtrain_2step", "post_1step": "posttrain_1step",
        "post_2step": "posttrain_2step"}


def summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--artifact-root", default=str(ROOT / "artifacts" / "bench-precond"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    results, seconds, metric = {}, {}, None
    for setting in SETTINGS:
        per_row = {key: [] for key in ROWS}
        t0 = time.perf_counter()
        for seed in range(args.seeds):
            cfg = get_preset(args.preset, [*args.set, f"network.consistency_boundary={setting}",
                                           f"midtrain.train.seed={seed}", f"posttrain.train.seed={seed}"],
                             artifact_root=args.artifact_root)
            evaluation = run_pipeline(cfg)["evaluation"].metrics
            metric = evaluation["info"]["primary_metric"]
            for key, row_key in ROWS.items():
                per_row[key].append(evaluation["by_key"][row_key][metric])
            print(setting, seed, {k: round(v[-1], 3) for k, v in per_row.items()}, flush=True)
        results[setting] = {key: summary(values) for key, values in per_row.items()}
        seconds[setting] = time.perf_counter() - t0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"preset": args.preset, "metric_name": metric, "seeds": list(range(args.seeds)),
                               "overrides": args.set, "settings": results, "seconds": seconds}, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
