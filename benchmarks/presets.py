"""The presets' results with several seeds: ``benchmarks/results/presets.json``, the README's results table.

For each preset and seed k, every training seed (teacher, rollouts, mid-training, post-training) is set to k
and the whole pipeline runs (``cmt_core.pipeline.run_pipeline``; complete artifacts are reused, so a rerun
only computes what is missing). Written per preset::

    {"metric_name", "seeds": [...],
     "teacher": {"nfe", "mean", "std", "per_seed"},
     "mid_1step", "mid_2step", "post_1step", "post_2step": {"mean", "std", "per_seed"},
     "mid_sigma": {"mid": [...], "post": [...]},          # the 2-step sigma each stage chose, per seed
     "seconds": {stage: mean seconds over the seeds}, "overrides": [...],
     "data_encoded": {"mean", "std", "per_seed"},     # latent presets: training images encoded and decoded
     "class_accuracy": {"teacher", "mid_1step", ...: {"mean", "std", "per_seed"}}}  # class-conditional digits

``--table`` prints the README's results table from the file instead of running anything.

``metric_name`` is the distance to the data (FD-digits on digits, sliced Wasserstein on 2-D data). With an
exact teacher the 1-step rows also carry ``flow_map_error`` (the error against the true ODE endpoint).

    .venv/bin/python benchmarks/presets.py                                   # toy, digits, digits-meanflow
    .venv/bin/python benchmarks/presets.py --presets digits --seeds 1
    .venv/bin/python benchmarks/presets.py --table
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "presets.json"
PRESETS = ("toy", "digits", "digits-meanflow")
ROWS = {"mid_1step": "midtrain_1step", "mid_2step": "midtrain_2step", "post_1step": "posttrain_1step",
        "post_2step": "posttrain_2step"}
STAGES = ("encoder", "encode", "teacher", "rollouts", "midtrain", "posttrain", "evaluation")  # those a preset runs


def summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def run_preset(name: str, seeds: list[int], root: Path, overrides: list[str]) -> dict:
    from cmt_core.comparison import SEED_FIELDS
    from cmt_core.pipeline import run_pipeline
    from cmt_core.presets import get_preset

    values = {key: [] for key in ("teacher", *ROWS)}
    exact = {key: [] for key in ("mid_1step", "post_1step")}
    sigmas, seconds, nfe, metric = {"mid": [], "post": []}, {s: [] for s in STAGES}, None, None
    floor, accuracy = [], {key: [] for key in ("teacher", *ROWS)}
    for seed in seeds:
        t0 = time.perf_counter()
        cfg = get_preset(name, [*overrides, *(f"{field}={seed}" for field in SEED_FIELDS)], artifact_root=root)
        results = run_pipeline(cfg)
        evaluation = results["evaluation"].metrics
        metric, rows = evaluation["info"]["data_metric"], evaluation["by_key"]
        nfe = rows["teacher"]["NFE"]
        values["teacher"].append(rows["teacher"][metric])
        for key, row in ROWS.items():
            values[key].append(rows[row][metric])
            if key in exact and "flow_map_error" in rows[row]:
                exact[key].append(rows[row]["flow_map_error"])
        sigmas["mid"].append(results["midtrain"].manifest["metrics"]["mid_sigma"])
        sigmas["post"].append(results["posttrain"].manifest["metrics"]["mid_sigma"])
        for stage in (s for s in STAGES if s in results):
            seconds[stage].append(results[stage].manifest["seconds"])
        if "class_accuracy" in rows["teacher"]:  # class-conditional digits: the classifier's accuracy
            for key, row in (("teacher", "teacher"), *ROWS.items()):
                accuracy[key].append(rows[row]["class_accuracy"])
        if "data_encoded" in rows:  # a latent space's floor: training images through the encoder and back
            floor.append(rows["data_encoded"][metric])
        print(f"{name} seed {seed}: " + ", ".join(f"{k} {v[-1]:.4g}" for k, v in values.items())
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    out = {"metric_name": metric, "seeds": seeds, "teacher": {"nfe": nfe, **summary(values["teacher"])},
           **{key: summary(values[key]) for key in ROWS}, "mid_sigma": sigmas,
           "seconds": {stage: statistics.fmean(s) for stage, s in seconds.items() if s}, "overrides": overrides,
           **({"data_encoded": summary(floor)} if floor else {}),
           **({"class_accuracy": {k: summary(v) for k, v in accuracy.items()}} if accuracy["teacher"] else {})}
    for key, errors in exact.items():
        if errors:
            out[key]["flow_map_error"] = summary(errors)
    return out


def _number(v: float) -> str:
    return f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"


def markdown(presets: dict) -> str:
    """One row per preset: the teacher and the four few-step figures as mean +- std over the seeds."""
    lines = ["| preset | metric | seeds | teacher (NFE) | CMT 1-step | CMT 2-step | post-trained 1-step | "
             "post-trained 2-step | minutes (all stages) |", "|" + " --- |" * 9]
    for name, p in presets.items():
        cells = [f"{_number(p[k]['mean'])} ± {_number(p[k]['std'])}" for k in ROWS]
        teacher = f"{_number(p['teacher']['mean'])} ± {_number(p['teacher']['std'])} ({p['teacher']['nfe']} NFE)"
        minutes = sum(p["seconds"].values()) / 60
        lines.append(f"| `{name}` | {p['metric_name']} | {len(p['seeds'])} | {teacher} | " + " | ".join(cells)
                     + f" | {minutes:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    from cmt_core.presets import PRESETS as KNOWN

    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=sorted(KNOWN))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--artifact-root", type=Path, default=ROOT / "artifacts" / "bench-presets")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table", action="store_true", help="print the results table of --out and stop")
    args = parser.parse_args(argv)
    if args.table:
        presets = json.loads(args.out.read_text())["presets"]
        print(markdown(presets))
        return presets
    previous = json.loads(args.out.read_text())["presets"] if args.out.exists() else {}
    results = {**previous, **{name: run_preset(name, list(range(args.seeds)), args.artifact_root, args.set)
                              for name in args.presets}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"presets": results}, indent=2))
    print(markdown(results))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
