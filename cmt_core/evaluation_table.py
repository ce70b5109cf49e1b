"""The pipeline's results table: every model of a run scored on the same noises, and the report.

Rows: the data floor, the teacher at its NFE, the teacher-initialised few-step model before any training
(the baseline CMT replaces), the CMT model and the post-trained model at 1 and 2 steps; with several seed
sets every figure is a mean with its spread beside it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from cmt_core.config import PipelineConfig
from cmt_core.data import load_data
from cmt_core.evaluation.report import write_report
from cmt_core.models import build_model, init_from, load_model
from cmt_core.scoring import Scorer
from cmt_core.solvers import function_evaluations
from cmt_core.time_grids import make_grid


def _curve(path: Path) -> list[dict]:
    log = path / "train" / "metrics.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []


def aggregate(per_set: list[dict]) -> dict:
    """Metrics over seed sets: the mean under the metric's name, the spread (std) under ``<name>_std``."""
    if len(per_set) == 1:
        return per_set[0]
    out = {}
    for key in per_set[0]:
        values = torch.tensor([m[key] for m in per_set], dtype=torch.float64)
        out[key], out[f"{key}_std"] = float(values.mean()), float(values.std())
    return out


def evaluate_pipeline(cfg: PipelineConfig, out_dir: Path, runtime, scorer) -> dict:
    """Score every model of the run on ``eval.num_seed_sets`` sets of noises and write the report."""
    from cmt_core import pipeline as P

    t0 = time.perf_counter()
    data = load_data(cfg.data)
    scorers = [scorer] + [Scorer(data, cfg, scorer.evaluator, runtime.device, seed_set=k)
                          for k in range(1, cfg.eval.num_seed_sets)]
    rows, grids = [], {}
    evaluator = scorer.evaluator

    floor = evaluator.floor()
    rows.append({"model": "data (held-out vs train)", "NFE": 0, **floor})
    grids["data"] = data.heldout[: min(len(data.heldout), 64 if data.heldout.ndim > 2 else 2000)]

    teacher = P.teacher_denoiser(cfg, data, runtime.device).eval()
    solver = cfg.teacher.sampler.model_copy(update={"sigma_max": cfg.rollout.solver.sigma_max})
    results = [s.teacher(teacher, solver) for s in scorers]
    nfe = function_evaluations(solver.name, make_grid(solver))
    rows.append({"model": f"teacher ({solver.name}, {solver.steps} steps)", "NFE": nfe,
                 **aggregate([m for m, _ in results])})
    grids["teacher"] = results[0][1]

    kind = P.posttrain_kind(cfg)
    weights = P.stage_path(cfg, "teacher") / P.MODEL_FILE
    if weights.exists():
        baseline = init_from(build_model(P.midtrain_kind(cfg), cfg.network, data.sample_shape,
                                         cfg.rollout.solver.sigma_min), load_model(weights)).to(runtime.device)
        metrics = aggregate([s.few_step(P.midtrain_kind(cfg), baseline, 1)[0] for s in scorers])
        rows.append({"model": "teacher-initialised, untrained", "NFE": 1, **metrics})

    named = [("CMT (mid-trained)", "midtrain", P.midtrain_kind(cfg)),
             (f"{cfg.posttrain.method.upper()} from {cfg.posttrain.init}", "posttrain", kind)]
    for label, stage, model_kind in named:
        model = load_model(P.stage_path(cfg, stage) / P.MODEL_FILE).to(runtime.device)
        for steps in (1, 2):
            results = [s.few_step(model_kind, model, steps) for s in scorers]
            rows.append({"model": f"{label}, {steps}-step", "NFE": steps, **aggregate([m for m, _ in results])})
            grids[f"{stage}_{steps}step"] = results[0][1]

    curves = {stage: _curve(P.stage_path(cfg, stage)) for stage in ("teacher", "midtrain", "posttrain")}
    seconds = {stage: (P.read_manifest(P.stage_path(cfg, stage)) or {}).get("seconds")
               for stage in ("teacher", "rollouts", "midtrain", "posttrain")}
    seconds["evaluation"] = time.perf_counter() - t0
    info = {"preset": cfg.preset, "device": str(runtime.device), "num_samples": len(scorer.x_T),
            "seed_sets": len(scorers), "primary_metric": scorer.primary, "seconds": seconds, **evaluator.info()}
    return write_report(out_dir, rows, grids, {k: v for k, v in curves.items() if v}, info)
