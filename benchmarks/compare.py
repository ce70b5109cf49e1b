"""The initialisation comparison on ``toy`` and ``digits``: ``benchmarks/results/init_comparison_<preset>.*``.

Runs ``cmt_core.comparison.run_comparison`` (the ``cmt-compare`` flow's body) with 3 seeds on each preset, at
these budgets (the same for every initialisation):

* ``toy``: 1,200 post-training steps at batch 256, evaluated every 200 (the preset post-trains 400: longer here so
  that the diffusion- and random-initialised paths have room to converge);
* ``digits``: the preset's 2,000 post-training steps at batch 256, evaluated every 500.

Artifacts go to ``artifacts/bench-presets``, shared with ``benchmarks/presets.py`` (its CMT arms are the presets'
own runs), so a rerun computes only what is missing.

    .venv/bin/python benchmarks/compare.py [--presets toy digits] [--seeds 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BUDGETS = {"toy": {"posttrain_steps": 1200, "eval_every": 200}, "digits": {}}


def main(argv: list[str] | None = None) -> dict:
    from cmt_core.comparison import CompareConfig, markdown, run_comparison

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(BUDGETS), choices=sorted(BUDGETS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--artifact-root", type=Path, default=ROOT / "artifacts" / "bench-presets")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    out = {}
    for preset in args.presets:
        t0 = time.perf_counter()
        cc = CompareConfig(preset=preset, seeds=args.seeds, workers=args.workers, artifact_root=args.artifact_root,
                           out_dir=args.out, **BUDGETS[preset])
        out[preset] = run_comparison(cc, report=lambda line: print(line, flush=True))
        print(markdown(out[preset]))
        print(f"{preset}: {(time.perf_counter() - t0) / 60:.1f} minutes", flush=True)
    return out


if __name__ == "__main__":
    main()
