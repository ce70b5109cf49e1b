"""The paper's comparison, run by the product: post-training from CMT, teacher (diffusion) and random weights.

For one preset, every *arm* (method x initialisation x seed) is the preset's pipeline with ``posttrain.init`` and
the seeds set; everything else is equal: the same post-training budget (steps, batch, lr schedule), the same
evaluation cadence and noises, the same seeds. Methods:

* a post-training method of the registry (``cmt_core.methods``) runs the preset ``<preset>-<method>`` when it exists
  (``meanflow``: ``<preset>-meanflow``, flow-map mid-training then Mean Flow), else ``<preset>`` itself, whose
  post-training must train the same model kind (``ect``: the preset's consistency tuning, ECT or ECD as the preset
  sets ``posttrain.method``, after ``cm``-form mid-training).

Both methods' arms of a seed read the same teacher and rollouts artifacts (their stage ids are equal), so those
are computed once and shared through the artifact cache; reruns reuse every complete arm. Teacher- and
random-initialised arms of consistency tuning start ECT's dt schedule at its first stage (``baseline_overrides``:
the largest gap, as ECT trains from a diffusion model), where a preset starts CMT weights at a later one, and have
no CMT boundary (``posttrain.ect.anchor_sigma``: there is no mid-trained map to keep).

Results (``summarise``): per method and initialisation, the post-training curve (1-step and 2-step data metric,
seed mean and std at every evaluation), how many iterations each path needs to reach the diffusion-initialised
path's final 2-step metric, and its total cost to get there in wall seconds and network evaluations: rollouts +
mid-training + post-training for the CMT path (whose mid-training checkpoints are evaluated too, so it may get there
before post-training starts), post-training alone for the others; the teacher's pre-training is reported apart.
Network evaluations count forward passes per training sample (each method's ``nfe`` in the registry; a JVP counts as
two, backward passes are not counted) and the rollout solver's calls per trajectory. Wall seconds are the rollout
stage's and the training loops' own (their evaluations left out), measured on uninterrupted runs.

``run_comparison(cc)`` runs the arms (``cc.workers`` processes for independent arms) and writes
``init_comparison_<preset>.json`` / ``.md`` / ``_<method>.png`` / ``_cost.png`` into ``cc.out_dir``; its
``seconds`` are this run's wall time (complete artifacts are reused, not recomputed) and the sum of every stage's
own time over the distinct artifacts (what the whole comparison costs from scratch on one process).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import multiprocessing
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, Field, field_validator, model_validator

from cmt_core.checkpoint import read_training_log
from cmt_core.config import PipelineConfig, StrictModel, registered
from cmt_core.engine import StageResult
from cmt_core.methods import get_method
from cmt_core.pipeline import compute_targets
from cmt_core.preflight import preflight
from cmt_core.presets import PRESETS, get_preset
from cmt_core.solvers import function_evaluations
from cmt_core.stages import method_of, plan
from cmt_core.time_grids import make_grid

log = logging.getLogger("cmt")
Init = Literal["cmt", "teacher", "random", "ect"]
INITS: tuple[str, ...] = ("cmt", "teacher", "random")
# the results' names of the arms: ``ect`` is vanilla ECT (``VANILLA_ECT``)
INIT_NAMES = {"cmt": "cmt", "teacher": "diffusion", "random": "random", "ect": "vanilla_ect"}
SEED_FIELDS = ("teacher.train.seed", "rollout.seed", "midtrain.train.seed", "posttrain.train.seed",
               "data.encoder.autoencoder.seed")  # the last: a latent space trained here (ids of others unchanged)
# The ``ect`` arm: consistency training on data alone from the teacher's weights, at ECT's published settings
# (locuslab/ect run_ecm.sh and ct_train.py's defaults: lognormal t (-1.1, 2.0), k = 8, b = 1, q = 2, c = 0, dt from
# the first stage; training/ct_training_loop.py:259-260 leaves the learning rate constant). The stage length, the
# learning rate and the batch are the preset's (ECT's 25,000 iterations a stage are sized for CIFAR-10).
VANILLA_ECT = ("posttrain.method=ect", "posttrain.init=teacher", "posttrain.ect.t_sampling=lognormal",
               "posttrain.ect.p_mean=-1.1", "posttrain.ect.p_std=2.0", "posttrain.ect.k=8.0", "posttrain.ect.b=1.0",
               "posttrain.ect.q=2.0", "posttrain.ect.huber_c=0.0", "posttrain.ect.weighting=inverse_dt",
               "posttrain.ect.start_stage=0", "posttrain.ect.anchor_sigma=0.0", "posttrain.train.lr_schedule=constant")
TARGET_PATTERN = re.compile(r"^([12])step<=([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)(x?)$")


@dataclass(frozen=True)
class Target:
    """A quality target: the ``steps``-step data metric at or below ``bound``, times the teacher's own score when
    ``relative``. Written ``"2step<=1.1x"`` (1.1 times the teacher's) or ``"1step<=13.5"`` (absolute)."""

    steps: int
    bound: float
    relative: bool

    @property
    def name(self) -> str:
        return f"{self.steps}step<={self.bound:g}{'x' if self.relative else ''}"

    def key(self, metric: str) -> str:
        """The evaluation's score this target bounds (``train.until_below``'s key), for the data metric ``metric``."""
        return f"{metric}_{self.steps}step"

    def value(self, teacher: float) -> float:
        """The bound, given the teacher's score on the same noises."""
        return self.bound * teacher if self.relative else self.bound


def parse_target(spec: str) -> Target:
    """``"2step<=1.1x"`` -> ``Target(2, 1.1, relative=True)``; a ValueError names the form otherwise."""
    match = TARGET_PATTERN.match(spec.replace(" ", ""))
    if match is None or float(match[2]) <= 0:
        raise ValueError(f"a target is '<1|2>step<=<positive number>[x]' ('x': times the teacher's score), e.g. "
                         f"'2step<=1.1x' or '1step<=13.5', not {spec!r}")
    return Target(int(match[1]), float(match[2]), match[3] == "x")


TargetSpec = Annotated[str, AfterValidator(lambda spec: parse_target(spec).name)]


class CompareConfig(StrictModel):
    """What ``run_comparison`` runs; every arm is ``preset`` (or ``<preset>-meanflow``) with ``overrides``."""

    preset: Literal[tuple(PRESETS)] = Field(
        "toy", description="the consistency preset; a method M uses '<preset>-M' when that preset exists")
    methods: tuple[registered("posttrain"), ...] = Field(("ect", "meanflow"), min_length=1)
    inits: tuple[Init, ...] = Field(INITS, min_length=1, description="the arms: cmt, teacher (diffusion), random, "
                                    "ect (vanilla ECT, VANILLA_ECT); must include 'cmt' and 'teacher'")
    seeds: int = Field(3, ge=1, le=64, description="seeds 0 .. seeds-1 (every training seed of an arm)")
    run_seeds: tuple[int, ...] | None = Field(
        None, min_length=1, description="target mode: compute only these of seeds 0 .. seeds-1 (e.g. one per machine); "
        "the summary reads the others' records from out_dir (cmt_core.savings.load_records); None: every seed")
    posttrain_steps: int | None = Field(None, ge=1, description="post-training steps of every arm (None: preset's)")
    eval_every: int | None = Field(None, ge=1, description="evaluation cadence of every arm (None: the preset's)")
    overrides: tuple[str, ...] = Field((), description="dotted key=value applied to every arm")
    baseline_overrides: tuple[str, ...] = Field(
        ("posttrain.ect.start_stage=0", "posttrain.ect.anchor_sigma=0"),
        description="applied to the teacher- and random-initialised arms")
    targets: tuple[TargetSpec, ...] = Field(
        (), description="the target-quality mode (cmt_core.savings): every arm post-trains until it meets every "
        "target or reaches its cap, e.g. ['2step<=1.1x', '1step<=1.5x'] ('x': times the teacher's score on the same "
        "noises; else absolute, in the data metric); empty: every arm at the same post-training budget")
    cap_factor: float = Field(10.0, ge=1.0, description="target mode: each other arm's post-training cap is at "
                              "least this many times the CMT path's cost (data, network evaluations, wall time)")
    workers: int = Field(1, ge=1, le=64, description="processes running independent arms at once")
    artifact_root: Path = Path("artifacts")
    out_dir: Path = Path("benchmarks/results")

    @field_validator("inits")
    @classmethod
    def _needs_references(cls, v: tuple) -> tuple:
        if "cmt" not in v or "teacher" not in v:
            raise ValueError("inits must include 'cmt' and 'teacher' (costs are measured against the diffusion init)")
        return v

    @model_validator(mode="after")
    def _seeds_to_run(self) -> CompareConfig:
        if self.run_seeds is None:
            return self
        if not self.targets:
            raise ValueError("run_seeds: only the target-quality mode (targets) runs seeds apart and merges their "
                             "records")
        if len(set(self.run_seeds)) != len(self.run_seeds) or not all(0 <= s < self.seeds for s in self.run_seeds):
            raise ValueError(f"run_seeds: distinct seeds among 0 .. {self.seeds - 1} (seeds={self.seeds}), got "
                             f"{list(self.run_seeds)}")
        return self

    def computed_seeds(self) -> list[int]:
        """The seeds this run computes: ``run_seeds`` in order, or every seed."""
        return sorted(self.run_seeds) if self.run_seeds is not None else list(range(self.seeds))

    @field_validator("targets")
    @classmethod
    def _distinct_targets(cls, v: tuple) -> tuple:
        if len(set(v)) != len(v):
            raise ValueError(f"targets must be distinct, got {list(v)}")
        return v

    def method_preset(self, method: str, init: str = "cmt") -> str:
        """The preset of ``method``'s arms: ``<preset>-<method>`` when it exists, else ``preset`` if its
        post-training trains the model kind ``method`` trains. The ``ect`` arm (vanilla ECT) is ``preset``'s, a
        consistency preset's, whatever the method."""
        if init == "ect":
            if get_method(get_preset(self.preset).posttrain.method).kind != "consistency":
                raise ValueError(f"inits: 'ect' (vanilla ECT) post-trains a consistency model: preset {self.preset!r} "
                                 "trains another kind; use a consistency preset (toy, digits, ...)")
            return self.preset
        if f"{self.preset}-{method}" in PRESETS:
            return f"{self.preset}-{method}"
        own = get_method(get_preset(self.preset).posttrain.method)
        if own.kind != get_method(method).kind:
            raise ValueError(f"methods: {method!r} needs a preset named '{self.preset}-{method}' or a preset whose "
                             f"post-training trains a {get_method(method).kind} model; {self.preset!r} trains a "
                             f"{own.kind} model ({own.name!r})")
        return self.preset


def arm_config(cc: CompareConfig, method: str, init: str, seed: int, steps: int | None = None,
               eval_every: int | None = None, extra: tuple[str, ...] = ()) -> PipelineConfig:
    """The pipeline config of one arm (validated; a bad override names its field): ``steps`` and ``eval_every``
    (post-training's) default to ``cc``'s, ``extra`` overrides come last. ``init='ect'``: vanilla ECT."""
    preset = cc.method_preset(method, init)
    own = VANILLA_ECT if init == "ect" else (f"posttrain.init={init}",)
    sets = [*cc.overrides, *own, *(f"{f}={seed}" for f in SEED_FIELDS)]
    if init != "cmt":
        sets += list(cc.baseline_overrides)
    steps, eval_every = steps or cc.posttrain_steps, eval_every or cc.eval_every
    if steps is not None:
        sets.append(f"posttrain.train.steps={steps}")
    if eval_every is not None:  # the loop evaluates on logging steps: log at least as often
        log_every = get_preset(preset, sets).posttrain.train.log_every
        sets += [f"posttrain.train.eval_every={eval_every}",
                 f"posttrain.train.log_every={math.gcd(log_every, eval_every)}"]
    return get_preset(preset, [*sets, *extra], artifact_root=cc.artifact_root)


def _run_job(cfg_json: str, targets: tuple[str, ...]) -> dict[str, StageResult]:
    """One arm's stages in a worker process (``run_comparison`` checked every arm's inputs before any ran)."""
    return compute_targets(plan(PipelineConfig.model_validate_json(cfg_json)), targets)


def _pin_gpu(slots, gpus: int) -> None:
    """Pool initializer: worker k sees only GPU k mod ``gpus`` (none: nothing to pin)."""
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slots.get() % gpus)


def run_jobs(jobs: list[tuple[PipelineConfig, tuple[str, ...]]], workers: int,
             report: Callable[[str], None] = log.info) -> list[dict[str, StageResult]]:
    """Run pipeline jobs (config, target stages) whose inputs were checked, ``workers`` at a time; their results in
    order. With several GPUs, each worker process uses one of them (``CUDA_VISIBLE_DEVICES``)."""
    def describe(cfg: PipelineConfig, targets) -> str:
        return f"{cfg.preset} init={cfg.posttrain.init} seed={cfg.posttrain.train.seed} -> {targets[-1]}"

    if workers == 1 or len(jobs) == 1:
        out = []
        for cfg, targets in jobs:
            out.append(compute_targets(plan(cfg), targets))
            report(f"done: {describe(cfg, targets)}")
        return out
    ctx, workers = multiprocessing.get_context("spawn"), min(workers, len(jobs))
    slots = ctx.Queue()
    for k in range(workers):
        slots.put(k)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_pin_gpu,
                                                initargs=(slots, torch.cuda.device_count())) as pool:
        futures = [pool.submit(_run_job, cfg.model_dump_json(), targets) for cfg, targets in jobs]
        for future, (cfg, targets) in zip(futures, jobs):
            future.result()
            report(f"done: {describe(cfg, targets)}")
        return [f.result() for f in futures]


def run_distinct(arms: dict[tuple, PipelineConfig], workers: int, report: Callable[[str], None] = log.info,
                 stage: Callable[[PipelineConfig], str] | None = None) -> dict[tuple, dict[str, StageResult]]:
    """Run arms to their ``stage`` (default ``target``), each distinct artifact once (the vanilla ECT arm is the
    same run for every method); the results by arm."""
    stage = stage or target
    keys = {key: (stage(cfg), plan(cfg).ids[stage(cfg)]) for key, cfg in arms.items()}
    distinct = {keys[key]: key for key in reversed(list(arms))}
    firsts = list(reversed(distinct.values()))
    done = dict(zip(firsts, run_jobs([(arms[k], (keys[k][0],)) for k in firsts], workers, report)))
    return {key: done[distinct[keys[key]]] for key in arms}


def target(cfg: PipelineConfig) -> str:
    """The last stage an arm needs: the CMT arm's evaluation (teacher and mid-trained figures), else post-training."""
    return "evaluation" if cfg.posttrain.init == "cmt" else "posttrain"


def run_comparison(cc: CompareConfig, report: Callable[[str], None] = log.info) -> dict:
    """Run every arm (shared stages first: teacher and rollouts per seed, then mid-training with the CMT arm and
    its evaluation per method and seed, then the other arms), then ``summarise`` and ``write_results``."""
    started = time.perf_counter()
    seeds = list(range(cc.seeds))
    arms = {(m, i, s): arm_config(cc, m, i, s) for m in cc.methods for i in cc.inits for s in seeds}
    first = cc.methods[0]
    for cfg in arms.values():  # a missing file fails the comparison before any arm starts
        resolved = plan(cfg)
        preflight(resolved, resolved.needed((target(cfg),)))
    report(f"comparison {cc.preset}: {len(arms)} arms ({', '.join(cc.methods)} x {', '.join(cc.inits)} x "
           f"{cc.seeds} seeds), {cc.workers} worker(s)")
    run_jobs([(arms[first, "cmt", s], ("rollouts",)) for s in seeds], cc.workers, report)
    order = [key for key in arms if key[1] == "cmt"] + [key for key in arms if key[1] != "cmt"]
    results = {}
    for phase in (order[:len(cc.methods) * cc.seeds], order[len(cc.methods) * cc.seeds:]):
        results.update(run_distinct({key: arms[key] for key in phase}, cc.workers, report))
    summary = summarise(cc, results)
    unique = {(r.stage, r.artifact_id): r.manifest.get("seconds") or 0.0
              for arm in results.values() for r in arm.values()}
    summary["seconds"] = {"this_run": time.perf_counter() - started, "every_stage_once": sum(unique.values()),
                          "teacher_pretraining": sum(v for (stage, _), v in unique.items() if stage == "teacher")}
    write_results(summary, cc.out_dir)
    return summary


# ------------------------------------------------------------------------------------------------ summary


def mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, sample std) of ``values`` (std 0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cumulative_seconds(rows: list[dict]) -> list[float]:
    """Each training-log row's training seconds since the run began, evaluations left out, over resumed calls.

    A row's ``seconds`` is taken before its own evaluation and its ``eval_seconds`` after it, so the evaluations
    before a row are the previous row's ``eval_seconds`` (that of the same call; a call's first row has none
    before it, the step-0 evaluation's row records its own). In logs whose step-0 row records none, a row that
    follows it and evaluates subtracts its own evaluation too (a slight undercount). A resumed call's rows
    (``resumed_from``) count on from the row before them (the run's time at the checkpoint resumed from; the time
    between that checkpoint and the interruption is spent again, so counted once)."""
    out, call, start, last, before = [], 0, 0.0, 0.0, None
    for row in rows:
        if row.get("resumed_from", 0) != call:
            call, start, before = row.get("resumed_from", 0), last, 0.0
        if "seconds" in row:
            spent = before if before is not None else row.get("eval_seconds", 0.0)
            last = start + row["seconds"] - spent
        before = row.get("eval_seconds")
        out.append(last)
    return out


def evaluations(folder: Path, metric: str) -> dict[int, dict]:
    """A training stage's evaluations: iteration -> {1-step, 2-step ``metric``, training wall seconds until then}."""
    rows = read_training_log(folder)
    return {r["step"]: {"metric_1step": r[f"eval_{metric}_1step"], "metric_2step": r[f"eval_{metric}_2step"],
                        "seconds": seconds} for r, seconds in zip(rows, cumulative_seconds(rows))
            if f"eval_{metric}_2step" in r}


def _mean_curve(per_seed: list[dict[int, dict]]) -> list[dict]:
    """Seed means and stds at the iterations every seed evaluated (``wall_s``: the mean training seconds)."""
    points = []
    for it in sorted(set.intersection(*(set(c) for c in per_seed))):
        point = {"iter": it}
        for k in ("metric_1step", "metric_2step"):
            point[k], point[f"{k}_std"] = mean_std([c[it][k] for c in per_seed])
        point["wall_s"] = statistics.fmean(c[it]["seconds"] for c in per_seed)
        points.append(point)
    return points


def training_nfe(cfg: PipelineConfig, stage: str) -> int:
    """Forward network evaluations per training sample and step of the training ``stage`` (its method's ``nfe``)."""
    return method_of(cfg, stage).nfe(cfg)


def posttrain_nfe_per_step(cc: CompareConfig, method: str, init: str) -> int:
    """Network evaluations of one post-training step of an arm, from that arm's own config (its batch size times
    ``training_nfe``): the CMT boundary's extra call counts in the CMT arm only."""
    cfg = arm_config(cc, method, init, 0)
    return training_nfe(cfg, "posttrain") * cfg.posttrain.train.batch_size


def rollout_cost(cfg: PipelineConfig, results: dict[str, StageResult]) -> dict:
    """The rollouts stage's wall seconds and the teacher calls it made (solver calls x trajectories)."""
    r = cfg.rollout
    return {"wall_s": results["rollouts"].manifest["seconds"],
            "nfe": r.num_trajectories * function_evaluations(r.solver.name, make_grid(r.solver))}


def cmt_path(cfg: PipelineConfig, mid: list[dict], post: list[dict], rollouts: dict) -> list[dict]:
    """The CMT path's evaluations in order, each with its total cost so far: rollouts, then mid-training's
    evaluations (a mid-trained checkpoint is already a few-step model), then post-training's after all of it."""
    m = cfg.midtrain.train
    per_mid, per_post = m.batch_size * training_nfe(cfg, "midtrain"), \
        cfg.posttrain.train.batch_size * training_nfe(cfg, "posttrain")
    path = [{"stage": "midtrain", **p, "wall_s": rollouts["wall_s"] + p["wall_s"],
             "nfe": rollouts["nfe"] + p["iter"] * per_mid} for p in mid]
    upfront = {"wall_s": path[-1]["wall_s"], "nfe": rollouts["nfe"] + m.steps * per_mid}
    return path + [{"stage": "posttrain", **p, "wall_s": upfront["wall_s"] + p["wall_s"],
                    "nfe": upfront["nfe"] + p["iter"] * per_post} for p in post]


def summarise(cc: CompareConfig, results: dict[tuple, dict[str, StageResult]]) -> dict:
    """The results contract of ``init_comparison_<preset>.json`` (module docstring) from the arms' artifacts.

    ``cost_to_quality`` of the CMT path is that of its first evaluation, mid-training's included, at or below
    the diffusion path's final 2-step metric (``reached_in`` says which stage); ``cost_with_full_midtrain`` and
    ``cost_ratio_full_midtrain`` count the whole configured mid-training whatever the checkpoint."""
    seeds = list(range(cc.seeds))
    evaluation = results[cc.methods[0], "cmt", 0]["evaluation"].metrics
    metric = evaluation["info"]["data_metric"]
    out = {"preset": cc.preset, "metric_name": metric, "seeds": seeds, "methods": {}}
    for method in cc.methods:
        evals = [results[method, "cmt", s]["evaluation"].metrics["by_key"] for s in seeds]
        cfg0 = arm_config(cc, method, "cmt", 0)
        teacher_stage = [results[method, "cmt", s]["teacher"].manifest for s in seeds]
        t_train = cfg0.teacher.train
        entry = {
            "preset": cc.method_preset(method), "posttrain_method": cfg0.posttrain.method,
            "budget": {"posttrain_steps": cfg0.posttrain.train.steps, "batch_size": cfg0.posttrain.train.batch_size,
                       "eval_every": cfg0.posttrain.train.eval_every, "midtrain_steps": cfg0.midtrain.train.steps,
                       "rollout_trajectories": cfg0.rollout.num_trajectories},
            "teacher": {"nfe": evals[0]["teacher"]["NFE"],
                        **dict(zip(("metric", "metric_std"), mean_std([e["teacher"][metric] for e in evals]))),
                        "pretraining": {"wall_s": statistics.fmean(m["seconds"] for m in teacher_stage),
                                        "nfe": t_train.steps * t_train.batch_size * training_nfe(cfg0, "teacher")
                                        if cfg0.teacher.source == "pretrain" else 0}},
            "mid_trained": {f"metric_{k}": mean_std([e[f"midtrain_{k}"][metric] for e in evals])[0]
                            for k in ("1step", "2step")},
            "inits": {}}
        curves = {init: _mean_curve([evaluations(results[method, init, s]["posttrain"].path, metric) for s in seeds])
                  for init in cc.inits}
        rollouts = {k: statistics.fmean(rollout_cost(cfg0, results[method, "cmt", s])[k] for s in seeds)
                    for k in ("wall_s", "nfe")}
        mid = _mean_curve([evaluations(results[method, "cmt", s]["midtrain"].path, metric) for s in seeds])
        path = cmt_path(cfg0, mid, curves["cmt"], rollouts)
        target = curves["teacher"][-1]["metric_2step"]  # the diffusion-initialised path's final 2-step metric
        for init in cc.inits:
            per_post = posttrain_nfe_per_step(cc, method, init)
            points = path if init == "cmt" else [{"stage": "posttrain", **p, "nfe": p["iter"] * per_post}
                                                 for p in curves[init]]
            reached = next((p for p in points if p["metric_2step"] <= target), None)
            arm = {"curve": curves[init],
                   "iters_to_diffusion_final_2step": None if reached is None else (
                       reached["iter"] if reached["stage"] == "posttrain" else 0),
                   "cost_to_quality": None if reached is None else {k: reached[k] for k in ("wall_s", "nfe")}}
            if init == "cmt":
                arm["path"] = path
                arm["reached_in"] = None if reached is None else f"{reached['stage']} iteration {reached['iter']}"
                full = next((p for p in path if p["stage"] == "posttrain" and p["metric_2step"] <= target), None)
                arm["cost_with_full_midtrain"] = None if full is None else {k: full[k] for k in ("wall_s", "nfe")}
            entry["inits"][INIT_NAMES[init]] = arm
        entry["upfront_cost_cmt"] = {k: path[len(mid)][k] for k in ("wall_s", "nfe")}  # at post-training's start
        cmt, diffusion = entry["inits"]["cmt"], entry["inits"]["diffusion"]
        for key, cost in (("cost_ratio_cmt_vs_diffusion", cmt["cost_to_quality"]),
                          ("cost_ratio_full_midtrain", cmt["cost_with_full_midtrain"])):
            entry[key] = None if cost is None else {k: cost[k] / max(diffusion["cost_to_quality"][k], 1e-12)
                                                    for k in ("wall_s", "nfe")}
        entry["cmt_beats_others"] = beats_beyond_spread(entry["inits"])
        out["methods"][method] = entry
    first = out["methods"][cc.methods[0]]
    out["teacher"] = {"nfe": first["teacher"]["nfe"], "metric": first["teacher"]["metric"]}
    out["mid_trained"] = first["mid_trained"]
    return out


def beats_beyond_spread(inits: dict) -> dict:
    """Per other init and step count: whether the CMT curve's mean + std is below the other's mean - std at every
    shared evaluation (lower is better), and at how many of them it is."""
    cmt = {p["iter"]: p for p in inits["cmt"]["curve"]}
    out = {}
    for name, entry in inits.items():
        if name == "cmt":
            continue
        for k in ("metric_1step", "metric_2step"):
            wins = [cmt[p["iter"]][k] + cmt[p["iter"]][f"{k}_std"] < p[k] - p[f"{k}_std"]
                    for p in entry["curve"] if p["iter"] in cmt]
            out[f"{name}_{k.split('_')[1]}"] = {"all": all(wins), "points": sum(wins), "of": len(wins)}
    return out


# ------------------------------------------------------------------------------------------------- output


ARM_COLOURS = {"cmt": "tab:blue", "diffusion": "tab:orange", "random": "tab:grey", "vanilla_ect": "tab:green"}


def number(v: float | None, spread: float | None = None) -> str:
    """A table cell: 3 significant digits (scientific from 1e4), "-" for a missing value, with "± spread"."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    text = f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return text + (f" ± {spread:.2g}" if spread is not None else "")


def markdown(summary: dict) -> str:
    """The comparison's tables: final metrics, cost to the diffusion path's final 2-step, and the targets."""
    metric = summary["metric_name"]
    sec = summary.get("seconds", {})
    lines = [f"# Initialisation comparison: `{summary['preset']}` ({len(summary['seeds'])} seeds, {metric})", ""]
    if sec:
        lines += [f"Every stage of every arm once: {sec['every_stage_once'] / 60:.1f} min on one process (teacher "
                  f"pre-training {sec['teacher_pretraining'] / 60:.1f} min of it); this run: "
                  f"{sec['this_run'] / 60:.1f} min (complete artifacts reused).", ""]
    for method, entry in summary["methods"].items():
        b = entry["budget"]
        lines += [f"## {method} (`{entry['preset']}`, post-training {entry['posttrain_method']})", "",
                  f"Budget: {b['posttrain_steps']} post-training steps at batch {b['batch_size']}, evaluated every "
                  f"{b['eval_every']}; CMT: {b['rollout_trajectories']} rollouts, {b['midtrain_steps']} mid-training "
                  f"steps. Teacher: {number(entry['teacher']['metric'], entry['teacher']['metric_std'])} at "
                  f"{entry['teacher']['nfe']} NFE (pre-training {entry['teacher']['pretraining']['wall_s']:.0f} s, "
                  f"not counted below). Mid-trained: 1-step {number(entry['mid_trained']['metric_1step'])}, 2-step "
                  f"{number(entry['mid_trained']['metric_2step'])}.", "",
                  "| init | start 1-step | start 2-step | final 1-step | final 2-step | iterations to diffusion's "
                  "final 2-step | cost: wall s | cost: network evals |", "|" + " --- |" * 8]
        for name, arm in entry["inits"].items():
            first, last, cost = arm["curve"][0], arm["curve"][-1], arm["cost_to_quality"] or {}
            lines.append(f"| {name} | {number(first['metric_1step'], first['metric_1step_std'])} | "
                         f"{number(first['metric_2step'], first['metric_2step_std'])} | "
                         f"{number(last['metric_1step'], last['metric_1step_std'])} | "
                         f"{number(last['metric_2step'], last['metric_2step_std'])} | "
                         f"{number(arm['iters_to_diffusion_final_2step'])} | {number(cost.get('wall_s'))} | "
                         f"{number(cost.get('nfe'))} |")
        ratio, full = entry["cost_ratio_cmt_vs_diffusion"], entry["cost_ratio_full_midtrain"]
        wins = ", ".join(f"{k}: {v['points']}/{v['of']}" for k, v in entry["cmt_beats_others"].items())
        lines += ["", "CMT path cost / diffusion path cost to the diffusion path's final 2-step metric: "
                  + ("never reached" if ratio is None else
                     f"{ratio['wall_s']:.2f} (wall), {ratio['nfe']:.2f} (network evaluations), reached in "
                     f"{entry['inits']['cmt']['reached_in']}")
                  + ("" if full is None else
                     f"; with the whole mid-training {full['wall_s']:.2f} / {full['nfe']:.2f}")
                  + f". Evaluations where CMT beats the other init beyond the seed spread: {wins}.", "",
                  f"![{method} curves](init_comparison_{summary['preset']}_{method}.png)", ""]
    lines.append(f"![cost to quality](init_comparison_{summary['preset']}_cost.png)")
    return "\n".join(lines) + "\n"


def plot(summary: dict, out_dir: Path) -> list[Path]:
    """Metric vs post-training iterations (1-step, 2-step; mean and std band per init) for each method, and the
    2-step metric against each path's total cost in wall seconds."""
    from cmt_core.evaluation.report import plt

    paths, colours = [], ARM_COLOURS
    preset, metric = summary["preset"], summary["metric_name"]
    for method, entry in summary["methods"].items():
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for ax, k in zip(axes, ("metric_1step", "metric_2step")):
            for name, arm in entry["inits"].items():
                xs = [p["iter"] for p in arm["curve"]]
                ys, sd = [p[k] for p in arm["curve"]], [p[f"{k}_std"] for p in arm["curve"]]
                ax.plot(xs, ys, marker="o", ms=3, color=colours[name], label=f"{name} init")
                ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)],
                                color=colours[name], alpha=0.2)
            ax.axhline(entry["teacher"]["metric"], color="k", ls="--", lw=1,
                       label=f"teacher ({entry['teacher']['nfe']} NFE)")
            ax.set(xlabel="post-training iterations", ylabel=metric, yscale="log",
                   title=f"{preset} {method}: {k.split('_')[1].replace('step', '-step')}")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"init_comparison_{preset}_{method}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    fig, axes = plt.subplots(1, len(summary["methods"]), figsize=(5 * len(summary["methods"]), 3.6), squeeze=False)
    for ax, (method, entry) in zip(axes[0], summary["methods"].items()):
        for name, arm in entry["inits"].items():
            points = arm.get("path", arm["curve"])  # the CMT path: rollouts, mid-training, then post-training
            ax.plot([p["wall_s"] for p in points], [p["metric_2step"] for p in points], marker="o", ms=3,
                    color=colours[name], label=f"{name} path")
        final = entry["inits"]["diffusion"]["curve"][-1]["metric_2step"]
        ax.axhline(final, color="tab:orange", ls=":", lw=1, label="diffusion path's final")
        ax.set(xlabel="total wall seconds (rollouts + mid-training + post-training)", ylabel=f"2-step {metric}",
               yscale="log", title=f"{preset} {method}: cost to quality")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / f"init_comparison_{preset}_cost.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [*paths, path]


def write_report(summary: dict, out_dir: Path, name: str, draw: Callable, tables: Callable[[dict], str]) -> Path:
    """``<name>_<preset>.json`` and ``.md`` (``tables``) and the plots (``draw``) into ``out_dir``; returns the
    markdown file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    draw(summary, out_dir)
    (out_dir / f"{name}_{summary['preset']}.json").write_text(json.dumps(summary, indent=2))
    md = out_dir / f"{name}_{summary['preset']}.md"
    md.write_text(tables(summary))
    return md


def write_results(summary: dict, out_dir: Path) -> Path:
    """``init_comparison_<preset>.json`` and ``.md`` and the plots into ``out_dir``; returns the markdown file."""
    return write_report(summary, out_dir, "init_comparison", plot, markdown)
