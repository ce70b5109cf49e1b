"""Ablations the paper did not run: ``benchmarks/results/ablations.json`` and ``ablations.png``.

On one preset (``toy`` by default, 3 seeds; ``digits`` with ``--presets digits``), each ablation varies one thing
of the CMT path and reports the mid-trained and post-trained models' 1-step and 2-step data metric (the evaluation
stage's, mean and std over the seeds) and the stages' wall seconds:

* ``midtrain_share``: mid-training length at a fixed total of mid- plus post-training steps (the preset's total;
  mid-training gets 1/6, 1/2 or the preset's share, post-training the rest);
* ``rollout_steps``: the rollout solver's steps (8, 16, 32) at the preset's mid-training length;
* ``trajectories``: stored trajectories at a fixed number of mid-training steps (1/16, 1/4 and 1x the preset's),
  which says how large a store must be. The store's size is reported beside each.

Every variant is an ordinary pipeline run (``cmt_core.pipeline``) in ``artifacts/bench-presets``, so the
preset's own runs are reused as the default variants.

    .venv/bin/python benchmarks/ablations.py [--presets toy digits] [--seeds 3] [--workers 2]
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
OUT = ROOT / "benchmarks" / "results" / "ablations.json"
ROWS = ("midtrain_1step", "midtrain_2step", "posttrain_1step", "posttrain_2step")


def variants(preset: str) -> dict[str, dict[str, list[str]]]:
    """Ablation -> variant label -> dotted overrides, from the preset's own budgets."""
    from cmt_core.presets import get_preset

    cfg = get_preset(preset)
    mid, post, n = cfg.midtrain.train.steps, cfg.posttrain.train.steps, cfg.rollout.num_trajectories
    total = mid + post
    shares = sorted({round(total / 6), round(total / 2), mid})
    return {
        "midtrain_share": {f"mid {m} + post {total - m}": [f"midtrain.train.steps={m}",
                                                             f"posttrain.train.steps={total - m}"] for m in shares},
        "rollout_steps": {f"{k} steps": [f"rollout.solver.steps={k}"] for k in (8, 16, 32)},
        "trajectories": {f"{n // d} trajectories": [f"rollout.num_trajectories={n // d}"] for d in (16, 4, 1)},
    }


def summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def run_preset(preset: str, seeds: int, workers: int, root: Path) -> dict:
    from cmt_core.comparison import SEED_FIELDS, run_jobs
    from cmt_core.data import load_data
    from cmt_core.preflight import preflight
    from cmt_core.presets import get_preset
    from cmt_core.stages import plan
    from cmt_core.trajectories.layout import sizing

    table = variants(preset)
    configs = {(a, v, s): get_preset(preset, [*sets, *(f"{f}={s}" for f in SEED_FIELDS)], artifact_root=root)
               for a, vs in table.items() for v, sets in vs.items() for s in range(seeds)}
    for cfg in configs.values():  # every variant's inputs, before any runs
        resolved = plan(cfg)
        preflight(resolved, resolved.needed(("evaluation",)))
    # teachers and rollouts first (shared by many variants: never two processes on one artifact)
    run_jobs(list({plan(c).ids["rollouts"]: (c, ("rollouts",)) for c in configs.values()}.values()), workers, print)
    results = dict(zip(configs, run_jobs([(c, ("evaluation",)) for c in configs.values()], workers, print)))
    out = {}
    for ablation, vs in table.items():
        out[ablation] = {}
        for label in vs:
            runs = [results[ablation, label, s] for s in range(seeds)]
            metric = runs[0]["evaluation"].metrics["info"]["data_metric"]
            cfg = configs[ablation, label, 0]
            r = cfg.rollout
            size = sizing(load_data(cfg.data).sample_shape, r.solver.steps + 1, r.num_trajectories, r.store.dtype,
                          r.store.keep_indices)
            out[ablation][label] = {
                "metric_name": metric, "overrides": vs[label],
                **{row: summary([run["evaluation"].metrics["by_key"][row][metric] for run in runs]) for row in ROWS},
                "seconds": {st: statistics.fmean(run[st].manifest["seconds"] for run in runs)
                            for st in ("rollouts", "midtrain", "posttrain")},
                "store_bytes": size["total_bytes"]}
            print(f"{preset} {ablation} {label}: " + ", ".join(f"{row} {out[ablation][label][row]['mean']:.4g}"
                                                               for row in ROWS), flush=True)
    return out


def plot(results: dict, path: Path) -> None:
    from cmt_core.evaluation.report import plt

    presets = list(results)
    ablations = list(next(iter(results.values())))
    fig, axes = plt.subplots(len(presets), len(ablations), figsize=(5 * len(ablations), 3.6 * len(presets)),
                             squeeze=False)
    for row_axes, preset in zip(axes, presets):
        for ax, ablation in zip(row_axes, ablations):
            entry = results[preset][ablation]
            labels = list(entry)
            for row, style in zip(ROWS, ("o--", "s--", "o-", "s-")):
                ax.errorbar(range(len(labels)), [entry[v][row]["mean"] for v in labels],
                            yerr=[entry[v][row]["std"] for v in labels], fmt=style, capsize=3,
                            label=row.replace("_", " "))
            ax.set_xticks(range(len(labels)), labels, fontsize=8)
            ax.set(title=f"{preset}: {ablation}", ylabel=entry[labels[0]]["metric_name"])
        row_axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["toy"], choices=["toy", "digits"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--artifact-root", type=Path, default=ROOT / "artifacts" / "bench-presets")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    for preset in args.presets:
        t0 = time.perf_counter()
        previous[preset] = {"seeds": list(range(args.seeds)), **run_preset(preset, args.seeds, args.workers,
                                                                             args.artifact_root)}
        previous[preset]["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(previous, indent=2))
    plot({p: {k: v for k, v in r.items() if k not in ("seeds", "seconds")} for p, r in previous.items()},
         args.out.with_suffix(".png"))
    print(f"wrote {args.out}")
    return previous


if __name__ == "__main__":
    main()
