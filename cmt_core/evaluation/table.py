"""The results table of a run: every model scored on the same noises, and the report.

Rows: the data floor, the teacher at its NFE, the teacher-initialised few-step model before any training
(the baseline CMT replaces), then each trained model at 1 and 2 steps (2 steps at its own intermediate
sigma, named in the row); with several seed sets every figure is a mean with its spread beside it. A conditional
run's rows also carry the class metrics beside the Frechet distance (the per-class distance and, on digits,
``class_accuracy``, the one higher-is-better column), the data row those of the held-out images.
Models, curves and timings come in as arguments (the stage that calls ``results_table`` loads them from its
input artifacts). Sample grids show decoded samples (``data.encoder``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cmt_core.encoders import IDENTITY
from cmt_core.evaluation.report import write_report
from cmt_core.evaluation.scoring import Scorer
from cmt_core.guidance import GuidedDenoiser
from cmt_core.solvers import function_evaluations
from cmt_core.time_grids import make_grid


@dataclass
class ScoredModel:
    label: str  # row label, e.g. "CMT (mid-trained)"
    key: str  # short name of its sample grids, e.g. "midtrain"
    sampler: str  # its few-step sampler, e.g. "consistency" | "flow_map" (``cmt_core.samplers``)
    model: nn.Module
    mid_sigma: float | None = None  # its 2-step intermediate sigma (None: ``eval.mid_sigma``)


def aggregate(per_set: list[dict]) -> dict:
    """Metrics over seed sets: the mean under the metric's name, the spread (std) under ``<name>_std``."""
    if len(per_set) == 1:
        return per_set[0]
    out = {}
    for key in per_set[0]:
        values = torch.tensor([m[key] for m in per_set], dtype=torch.float64)
        out[key], out[f"{key}_std"] = float(values.mean()), float(values.std())
    return out


def results_table(out_dir: Path, scorers: list[Scorer], teacher: nn.Module, teacher_solver,
                  baseline: ScoredModel | None, trained: list[ScoredModel], curves: dict[str, list[dict]],
                  run_info: dict, stage_seconds: dict, guidance: str = "none", scale: float = 1.0,
                  sweep: dict | None = None) -> dict:
    """Score the teacher, the untrained ``baseline`` (1 step) and ``trained`` models (1 and 2 steps) with
    every scorer (one per seed set), then write the report into ``out_dir``; returns ``metrics.json``, whose
    ``by_key`` names the rows ``data`` (in a latent space also ``data_encoded``: training images through the
    encoder and back, the floor of what a model of latents can score), ``teacher``, the baseline's key and
    ``<key>_1step`` / ``<key>_2step``.

    ``teacher_solver``: the ``SolverConfig`` the teacher samples with; ``guidance``, ``scale``: the kind of
    guidance (``cmt_core.guidance``) and the scale ``teacher`` is guided at, named in its row; ``sweep``: the
    teacher guided at other scales (``scale`` itself is the row ``teacher``), ``{w: denoiser}``, each a row
    ``teacher_w<w>`` (a guided teacher's NFE counts
    both of its calls per step); ``curves``: training-log rows per stage; ``run_info``: what the
    report states first (preset, device); ``stage_seconds``: the earlier stages' wall times (this call adds
    ``evaluation``)."""
    t0 = time.perf_counter()
    evaluator, data = scorers[0].evaluator, scorers[0].evaluator.data
    by_class = scorers[0].labels is not None and evaluator.scores_by_class
    rows, keys, grids = [], [], {}

    rows.append({"model": evaluator.floor_label, "NFE": 0, **evaluator.floor(by_class)})
    keys.append("data")
    grids["data"] = getattr(data, evaluator.reference_split).read(slice(0, 2000 if evaluator.is_points else 64))
    if data.encoder.name != IDENTITY.name:  # a latent space's own floor: training images encoded and decoded
        n = min(len(data.train), len(scorers[0].x_T))
        g = torch.Generator().manual_seed(scorers[0].seed)
        decoded = data.encoder.decode(data.encoder.encode(data.train.read(slice(0, n)), g))
        labels = data.train.labels(slice(0, n)) if by_class else None
        rows.append({"model": f"data through the encoder ({n} training images)", "NFE": 0,
                     **evaluator.score(decoded, labels)})
        keys.append("data_encoded")
        grids["data_encoded"] = decoded[:64]

    nfe = function_evaluations(teacher_solver.name, make_grid(teacher_solver))
    solver = f"{teacher_solver.name}, {teacher_solver.steps} steps"
    for key, w, denoiser in [("teacher", scale, teacher), *((f"teacher_w{w:g}", w, d) for w, d in
                                                             (sweep or {}).items())]:
        results = [s.teacher(denoiser, teacher_solver) for s in scorers]
        label = "" if guidance == "none" else f", {guidance} w={w:g}"
        calls = 2 if isinstance(denoiser, GuidedDenoiser) else 1
        rows.append({"model": f"teacher ({solver}{label})", "NFE": nfe * calls, **aggregate([m for m, _ in results])})
        keys.append(key)
        grids[key] = data.encoder.decode(results[0][1])

    if baseline is not None:
        metrics = aggregate([s.few_step(baseline.sampler, baseline.model, 1)[0] for s in scorers])
        rows.append({"model": baseline.label, "NFE": 1, **metrics})
        keys.append(baseline.key)

    mid_sigmas = {}
    for entry in trained:
        mid_sigmas[entry.key] = scorers[0].cfg.mid_sigma if entry.mid_sigma is None else entry.mid_sigma
        for steps in (1, 2):
            results = [s.few_step(entry.sampler, entry.model, steps, mid_sigmas[entry.key]) for s in scorers]
            label = f"{entry.label}, {steps}-step" + (f" (sigma {mid_sigmas[entry.key]:.3g})" if steps == 2 else "")
            rows.append({"model": label, "NFE": steps, **aggregate([m for m, _ in results])})
            keys.append(f"{entry.key}_{steps}step")
            grids[f"{entry.key}_{steps}step"] = data.encoder.decode(results[0][1])

    info = {**run_info, "num_samples": len(scorers[0].x_T), "seed_sets": len(scorers),
            "primary_metric": scorers[0].primary, "data_metric": evaluator.metric_name, "2-step sigma": mid_sigmas,
            "seconds": {**stage_seconds, "evaluation": time.perf_counter() - t0}, **evaluator.info(by_class)}
    return write_report(out_dir, rows, grids, {k: v for k, v in curves.items() if v}, info, keys)
