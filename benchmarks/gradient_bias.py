"""The paper's theory on the exact ``toy`` teacher: ``benchmarks/results/gradient_bias.json`` and ``.png``.

Measures (``cmt_core.gradient_bias``) the gradient bias || grad L_oracle - grad L || of

* the CMT objective against the rollout solver's step size h, for Euler (order 1), Heun and DPM-Solver++(2M)
  (2), DPM-Solver++(3M) (3) and the reference's third-order code form ``dpm3m_lu``; slopes fitted over
  N = 32 ... 256 steps (h = ln(sigma_max / sigma_min) / N), against a teacher perturbed by eps, and
* consistency distillation against its anchor gap delta_u (Heun steps of the 256-step size, times above 0.5),
  for the CMT-, diffusion- and random-initialised models;
* the discrete-time distillation objective of post-training at initialisation from each of those models
  (``bias_at_init``: the squared bias, the paper's quantity; ``bias_at_init_norm`` its root).

The models are the ``toy`` preset's seed-0 artifacts (teacher weights for the diffusion init, the mid-trained
weights for CMT), computed first when missing. Written::

    {"bias_at_init": {init: squared bias}, "bias_at_init_norm": {...}, "oracle_gradient_norm": {...},
     "slope_vs_dt": {solver: {"fitted", "order", "fitted_squared", "h", "bias"}},
     "slope_vs_anchor": {init: {"fitted", "predicted", "delta_u", "bias"}},
     "slope_vs_eps": {"fitted", "predicted", "eps", "bias"}, "samples", "seconds"}

    .venv/bin/python benchmarks/gradient_bias.py [--samples 2048] [--artifact-root artifacts/bench-presets]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "gradient_bias.json"
ORDERS = {"euler": 1, "heun": 2, "dpm2m": 2, "dpm3m": 3, "dpm3m_lu": 2}
STEPS = (16, 32, 64, 128, 256)
ANCHORS = (0.004, 0.01, 0.03, 0.1, 0.3)  # u; delta_u = u - sigma_min
EPSILONS = (1e-3, 1e-2, 1e-1)
ANCHOR_MIN_TIME = 0.5


def toy_models(root: Path) -> dict[str, torch.nn.Module]:
    """Consistency models (float64) at the three initialisations, from the ``toy`` preset's seed-0 artifacts."""
    from cmt_core.models import build_model, init_from, load_model
    from cmt_core.pipeline import run_pipeline
    from cmt_core.presets import get_preset

    cfg = get_preset("toy", artifact_root=root)
    results = run_pipeline(cfg, targets=("midtrain",))
    smin = cfg.rollout.solver.sigma_min
    torch.manual_seed(cfg.posttrain.train.seed)
    random = build_model("consistency", cfg.network.model_dump(), (2,), smin)
    diffusion = init_from(build_model("consistency", cfg.network.model_dump(), (2,), smin),
                          load_model(results["teacher"].path / "model.pt"))
    cmt = load_model(results["midtrain"].path / "model.pt")
    return {name: m.double().eval() for name, m in (("cmt", cmt), ("diffusion", diffusion), ("random", random))}


def measure(models: dict, samples: int, report=print) -> dict:
    from cmt_core import gradient_bias as gb
    from cmt_core.data.synthetic import GaussianMixture

    setup = gb.make_setup(GaussianMixture(8, 2.0, 0.1), samples=samples)
    out = {"samples": samples, "bias_at_init": {}, "bias_at_init_norm": {}, "slope_vs_dt": {}, "slope_vs_anchor": {}}
    out["oracle_gradient_norm"] = {}
    for name, model in models.items():
        g = gb.oracle_gradient(model, setup)
        b = gb.bias(g, gb.cd_adjacent_gradient(model, setup))
        out["bias_at_init"][name], out["bias_at_init_norm"][name] = b * b, b
        out["oracle_gradient_norm"][name] = float(g.norm())
        report(f"bias at init ({name}): {b * b:.4g} (oracle gradient norm {g.norm():.4g})")
    model = models["cmt"]
    g_oracle = gb.oracle_gradient(model, setup)
    for solver, order in ORDERS.items():
        hs = [gb.step_size(setup, n) for n in STEPS]
        biases = [gb.bias(g_oracle, gb.cmt_gradient(model, setup, solver, n)) for n in STEPS]
        slope = gb.fitted_slope(hs[1:], biases[1:])
        out["slope_vs_dt"][solver] = {"fitted": slope, "order": order, "fitted_squared": 2 * slope,
                                      "steps": list(STEPS), "h": hs, "bias": biases}
        report(f"CMT bias vs h, {solver}: slope {slope:.3f} (order {order})")
    biases = [gb.bias(g_oracle, gb.cmt_gradient(model, setup, "dpm3m", STEPS[-1], eps)) for eps in EPSILONS]
    out["slope_vs_eps"] = {"fitted": gb.fitted_slope(list(EPSILONS), biases), "predicted": 1, "eps": list(EPSILONS),
                           "bias": biases, "solver": f"dpm3m, {STEPS[-1]} steps"}
    report(f"CMT bias vs eps: slope {out['slope_vs_eps']['fitted']:.3f} (predicted 1)")
    deltas = [u - setup.sigma_min for u in ANCHORS]
    for name, m in models.items():
        g = gb.oracle_gradient(m, setup, min_time=ANCHOR_MIN_TIME)
        biases = [gb.bias(g, gb.cd_gradient(m, setup, u, STEPS[-1], min_time=ANCHOR_MIN_TIME)) for u in ANCHORS]
        out["slope_vs_anchor"][name] = {"fitted": gb.fitted_slope(deltas, biases), "predicted": 1,
                                        "delta_u": deltas, "bias": biases}
        report(f"CD bias vs delta_u ({name}): slope {out['slope_vs_anchor'][name]['fitted']:.3f} (predicted 1)")
    return out


def plot(out: dict, path: Path) -> None:
    """Three log-log panels: CMT bias vs h per solver, CD bias vs delta_u per init, CMT bias vs eps."""
    from cmt_core.evaluation.report import plt

    e, dt = out["slope_vs_eps"], out["slope_vs_dt"]
    panels = [  # (lines: label -> (x, y), x label, y label, title)
        ({f"{k}: slope {v['fitted']:.2f} (order {v['order']})": (v["h"], v["bias"]) for k, v in dt.items()},
         "rollout step size h (log sigma)", "||grad L_oracle - grad L_CMT||", "CMT: bias vs solver step"),
        ({f"{k} init: slope {v['fitted']:.2f}": (v["delta_u"], v["bias"]) for k, v in out["slope_vs_anchor"].items()},
         "anchor gap delta_u = u - sigma_min", "||grad L_oracle - grad L_CD||",
         "consistency distillation: bias vs anchor (predicted slope 1)"),
        ({f"CMT ({e['solver']}): slope {e['fitted']:.2f}": (e["eps"], e["bias"])},
         "teacher perturbation eps", "||grad L_oracle - grad L_CMT||", "bias vs teacher error (predicted slope 1)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (lines, xlabel, ylabel, title) in zip(axes, panels):
        for label, (xs, ys) in lines.items():
            ax.loglog(xs, ys, marker="o", label=label)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.legend(fontsize=8)
    inits = out["bias_at_init"]
    axes[2].text(0.02, 0.02, "post-training CD bias^2 at init: " + ", ".join(f"{k} {v:.3g}" for k, v in inits.items()),
                 transform=axes[2].transAxes, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--artifact-root", type=Path, default=ROOT / "artifacts" / "bench-presets")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    out = measure(toy_models(args.artifact_root), args.samples)
    out["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    plot(out, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
