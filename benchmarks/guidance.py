"""Class-conditional digits with guidance: ``benchmarks/results/guidance_digits.json``, ``.md`` and ``.png``.

The ``digits-cond`` preset (a conditional teacher trained with label dropout, classifier-free guidance at w in its
rollouts, CMT, ECD with the guided teacher step) run with ``--seeds`` seeds at the preset's w, and, on seed 0, at
every other w of ``--scales``: the student sweep (each w is its own rollouts, mid-training and post-training; the
teacher is shared). Each run's evaluation scores the models on 2,000 samples with uniform labels, 4 noise sets:
FD-digits, FD-digits per class and class accuracy (the digits classifier's accuracy on samples drawn for a given
class); the seed runs also score the teacher at every w of the preset's sweep.

Outputs: the table of the preset's w (teacher at w, CMT and ECD at 1 and 2 steps: mean and std over seeds), the
teacher's sweep (mean over seeds) and the students' sweep (seed 0), and one plot of FD-digits against class
accuracy for the teacher and the 1- and 2-step ECD students across w.

    .venv/bin/python benchmarks/guidance.py [--seeds 3] [--scales 1 1.5 2 3 4] [--workers 2] [--tables-only]
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
OUT = ROOT / "benchmarks" / "results" / "guidance_digits.json"
PRESET = "digits-cond"
METRICS = ("FD-digits", "FD-digits per class", "class_accuracy")
ROWS = {"teacher": "teacher", "CMT 1-step": "midtrain_1step", "CMT 2-step": "midtrain_2step",
        "ECD 1-step": "posttrain_1step", "ECD 2-step": "posttrain_2step"}


def summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def configs(seeds: int, scales: list[float], root: Path) -> dict:
    """(w, seed) -> config: the preset's w on every seed, the other scales on seed 0 (without the teacher sweep)."""
    from cmt_core.comparison import SEED_FIELDS
    from cmt_core.presets import get_preset

    w0 = get_preset(PRESET).guidance.scale
    runs = {(w0, s): [f"{f}={s}" for f in SEED_FIELDS] for s in range(seeds)}
    runs |= {(w, 0): [f"{f}=0" for f in SEED_FIELDS] + ["guidance.sweep=[]"] for w in scales if w != w0}
    return {key: get_preset(PRESET, [*sets, f"guidance.scale={key[0]}", f"guidance.rollout_scale={key[0]}"],
                            artifact_root=root) for key, sets in runs.items()}


def run(seeds: int, scales: list[float], workers: int, root: Path) -> dict:
    from cmt_core.comparison import run_jobs
    from cmt_core.preflight import preflight
    from cmt_core.stages import plan

    cfgs = configs(seeds, scales, root)
    for cfg in cfgs.values():
        resolved = plan(cfg)
        preflight(resolved, resolved.needed(("evaluation",)))
    # teachers first (shared across w): never two processes on one artifact
    run_jobs(list({plan(c).ids["teacher"]: (c, ("teacher",)) for c in cfgs.values()}.values()), workers, print)
    results = dict(zip(cfgs, run_jobs([(c, ("evaluation",)) for c in cfgs.values()], workers, print)))
    w0 = next(iter(cfgs))[0]
    evals = {key: r["evaluation"].metrics["by_key"] for key, r in results.items()}
    seed_runs = [evals[w0, s] for s in range(seeds)]
    table = {label: {m: summary([e[key][m] for e in seed_runs]) for m in METRICS} for label, key in ROWS.items()}
    teacher_sweep = {}
    for w in cfgs[w0, 0].guidance.sweep:
        key = "teacher" if w == w0 else f"teacher_w{w:g}"
        teacher_sweep[f"{w:g}"] = {m: summary([e[key][m] for e in seed_runs]) for m in METRICS}
    student_sweep = {f"{w:g}": {label: {m: evals[w, 0][ROWS[label]][m] for m in METRICS}
                                for label in ("ECD 1-step", "ECD 2-step", "CMT 2-step")}
                     for w in sorted({w for w, s in evals if s == 0})}
    seconds = {st: statistics.fmean(results[w0, s][st].manifest["seconds"] for s in range(seeds))
               for st in ("teacher", "rollouts", "midtrain", "posttrain", "evaluation")}
    return {"preset": PRESET, "scale": w0, "seeds": list(range(seeds)), "num_samples": cfgs[w0, 0].eval.num_samples,
            "noise_sets": cfgs[w0, 0].eval.num_seed_sets, "table": table, "teacher_sweep": teacher_sweep,
            "student_sweep": student_sweep, "stage_seconds": seconds}


def markdown(out: dict) -> str:
    w0, n = out["scale"], len(out["seeds"])
    lines = [f"`{out['preset']}`, classifier-free guidance at w = {w0:g}, {n} seeds ({out['num_samples']} samples x "
             f"{out['noise_sets']} noise sets per seed; mean and std over seeds)", "",
             "| model | network calls | FD-digits | FD-digits per class | class accuracy (%) |",
             "|---|---|---|---|---|"]
    nfe = {"teacher": "35 x 2", "CMT 1-step": "1", "CMT 2-step": "2", "ECD 1-step": "1", "ECD 2-step": "2"}
    for label, row in out["table"].items():
        cells = [f"{row[m]['mean']:.2f} ± {row[m]['std']:.2f}" for m in METRICS]
        name = f"{label} (w = {w0:g})" if label == "teacher" else label
        lines.append(f"| {name} | {nfe[label]} | " + " | ".join(cells) + " |")
    lines += ["", "Teacher across w (mean over seeds) and the ECD students post-trained at each w (seed 0):", "",
              "| w | teacher FD-digits | teacher accuracy | ECD 2-step FD-digits | ECD 2-step accuracy |",
              "|---|---|---|---|---|"]
    for w, t in out["teacher_sweep"].items():
        s = out["student_sweep"].get(w, {}).get("ECD 2-step")
        student = f"{s['FD-digits']:.2f} | {s['class_accuracy']:.2f}" if s else "— | —"
        lines.append(f"| {w} | {t['FD-digits']['mean']:.2f} | {t['class_accuracy']['mean']:.2f} | {student} |")
    return "\n".join(lines) + "\n"


def plot(out: dict, path: Path) -> None:
    """FD-digits against the class error (100 - accuracy, symmetric log axis: the sweep's accuracies crowd near
    100%) for the teacher and the ECD students across w; both lower-is-better, so the best lie bottom left."""
    from cmt_core.evaluation.report import plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    sweeps = {"teacher (35 x 2 calls, mean of seeds)": {w: (t["FD-digits"]["mean"], t["class_accuracy"]["mean"])
                                                        for w, t in out["teacher_sweep"].items()}}
    for label in ("ECD 1-step", "ECD 2-step"):
        sweeps[f"{label} (seed 0)"] = {w: (s[label]["FD-digits"], s[label]["class_accuracy"])
                                       for w, s in out["student_sweep"].items()}
    for (label, points), style in zip(sweeps.items(), ("o-", "s--", "^--")):
        ws = list(points)
        xs, ys = [points[w][0] for w in ws], [100 - points[w][1] for w in ws]
        ax.plot(xs, ys, style, label=label)
        for w, x, y in zip(ws, xs, ys):
            ax.annotate(f"w={w}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_yscale("symlog", linthresh=0.05)
    ax.set(xlabel="FD-digits (lower is better)", ylabel="class error, % = 100 - accuracy (lower is better)",
           title=f"{out['preset']}: guidance scale sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--artifact-root", type=Path, default=ROOT / "artifacts" / "bench-guidance")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--tables-only", action="store_true", help="rewrite the .md and .png from --out's JSON")
    args = parser.parse_args(argv)
    if args.tables_only:
        out = json.loads(args.out.read_text())
    else:
        t0 = time.perf_counter()
        out = run(args.seeds, args.scales, args.workers, args.artifact_root)
        out["seconds"] = time.perf_counter() - t0
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))
    args.out.with_suffix(".md").write_text(markdown(out))
    plot(out, args.out.with_suffix(".png"))
    print(markdown(out))
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
