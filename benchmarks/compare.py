"""The initialisation comparison on ``toy`` and ``digits``: ``benchmarks/results/init_comparison_<preset>.*``, and
with ``--targets`` the savings at a target quality: ``benchmarks/results/savings_<preset>.*``.

Runs ``cmt_core.comparison.run_comparison`` (the ``cmt-compare`` flow's body) with 3 seeds on each preset, at
these budgets (the same for every initialisation):

* ``toy``: 1,200 post-training steps at batch 256, evaluated every 200 (the preset post-trains 400: longer here so
  that the diffusion- and random-initialised paths have room to converge);
* ``digits`` and ``digits-cond``: the preset's 2,000 post-training steps at batch 256, evaluated every 500.

With ``--targets`` (e.g. ``--targets '2step<=1.1x' '1step<=1.5x'``) it runs ``cmt_core.savings.run_savings``
instead, with the vanilla ECT arm, each arm until it meets every target or its cap (``--cap-factor`` times the CMT
path's cost). The CMT arm's own post-training cap and the cadence (``SAVINGS``): ``toy`` 2,000 steps evaluated
every 50, ``digits`` and ``digits-cond`` 8,000 evaluated every 250 (four times the presets' post-training, at a
constant learning rate); the other arms' cadences follow from their caps.

Artifacts go to ``artifacts/bench-presets``, shared with ``benchmarks/presets.py`` (its CMT arms are the presets'
own runs), so a rerun computes only what is missing, and an interrupted run resumes from its arms' checkpoints.

    .venv/bin/python benchmarks/compare.py [--presets toy digits] [--seeds 3] [--workers 2]
    .venv/bin/python benchmarks/compare.py --targets '2step<=1.1x' '1step<=1.5x' [--presets toy]
    # guided Mean Flow on class-conditional digits: CMT + Mean Flow vs Mean Flow from diffusion / random weights
    .venv/bin/python benchmarks/compare.py --presets digits-cond --methods meanflow --inits cmt teacher random \
        --targets '1step<=1.3x' --seeds 1
    .venv/bin/python benchmarks/compare.py --presets toy digits --table   # the README's savings tables
    # one seed per machine (or per sitting): each writes its record to --out, the summary merges what is there
    .venv/bin/python benchmarks/compare.py --presets digits --targets '2step<=1.1x' '1step<=1.5x' --run-seeds 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BUDGETS = {"toy": {"posttrain_steps": 1200, "eval_every": 200}, "digits": {}, "digits-cond": {}}
SAVINGS = {"toy": {"posttrain_steps": 2000, "eval_every": 50}, "digits": {"posttrain_steps": 8000, "eval_every": 250},
           "digits-cond": {"posttrain_steps": 8000, "eval_every": 250}}


def main(argv: list[str] | None = None) -> dict:
    from cmt_core.comparison import INITS, CompareConfig, run_comparison
    from cmt_core.comparison import markdown as comparison_markdown
    from cmt_core.errors import PreflightError, config_message
    from cmt_core.savings import markdown as savings_markdown
    from cmt_core.savings import run_savings

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(BUDGETS), choices=sorted(BUDGETS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--run-seeds", type=int, nargs="+", help="the savings mode: compute only these seeds (the "
                        "others' records are read from --out)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--targets", nargs="+", default=[], help="the savings mode's targets")
    parser.add_argument("--cap-factor", type=float, default=10.0)
    parser.add_argument("--methods", nargs="+", default=["ect", "meanflow"],
                        help="post-training methods (meanflow on digits-cond: digits-cond-meanflow, guided Mean Flow)")
    parser.add_argument("--inits", nargs="+", default=None, help="the savings mode's arms (default: all with vanilla "
                        "ECT)")
    parser.add_argument("--artifact-root", type=Path, default=ROOT / "artifacts" / "bench-presets")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--table", action="store_true", help="print the README's savings table of each preset's "
                        "savings_<preset>.json in --out and stop")
    args = parser.parse_args(argv)
    if args.table:
        from cmt_core.savings import readme_table

        for preset in args.presets:
            path = args.out / f"savings_{preset}.json"
            if not path.is_file():
                parser.error(f"--table: no {path} (run the preset with --targets first)")
            print(f"{preset}:\n{readme_table(json.loads(path.read_text()))}")
        return {}
    out = {}
    for preset in args.presets:
        t0 = time.perf_counter()
        common = {"preset": preset, "seeds": args.seeds, "workers": args.workers, "artifact_root": args.artifact_root,
                  "out_dir": args.out, "methods": tuple(args.methods)}
        if args.targets:
            try:  # a bad value or a record of other settings: one line naming the field, exit 2
                cc = CompareConfig(**common, **SAVINGS[preset], inits=tuple(args.inits or (*INITS, "ect")),
                                   run_seeds=args.run_seeds, targets=args.targets, cap_factor=args.cap_factor)
                out[preset] = run_savings(cc, report=lambda line: print(line, flush=True))
            except PreflightError as err:
                parser.error(str(err))
            except ValueError as err:
                parser.error(config_message(err))
            print(savings_markdown(out[preset]))
        else:
            cc = CompareConfig(**common, **BUDGETS[preset])
            out[preset] = run_comparison(cc, report=lambda line: print(line, flush=True))
            print(comparison_markdown(out[preset]))
        print(f"{preset}: {(time.perf_counter() - t0) / 60:.1f} minutes", flush=True)
    return out


if __name__ == "__main__":
    main()
