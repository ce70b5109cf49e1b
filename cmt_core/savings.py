"""The paper's savings claim, measured at convergence: the target-quality mode of ``cmt compare``.

The paper claims "up to 98% less training data and GPU time than CMs" and "about 50% of the training time of Mean
Flow from scratch" for the same quality. Here every arm of the comparison (``cmt_core.comparison``: the CMT path,
post-training from the teacher's weights (the diffusion path), from random weights, and vanilla ECT) trains until
it meets every target or reaches its cap, and each path's whole cost to each target is read at its first
evaluation at or below it.

Targets (``CompareConfig.targets``): ``"<k>step<=<v>x"`` (v times the teacher's score) or ``"<k>step<=<v>"``
(absolute), on the data metric of k-step samples (FD-digits, sliced Wasserstein, FID) as the training evaluations
score it; the teacher's score is taken on the same noises (``stages.teacher_score``), per seed (each seed trains
its own teacher).

The run (``run_savings``):

1. the teacher and the rollouts of every seed (shared by every arm), and the teacher's score;
2. the CMT arms: the preset's mid-training (its evaluations are few-step models too, so the path may meet a target
   before post-training), then post-training with ``train.until_below`` set to the targets, capped at
   ``posttrain_steps`` (the preset's when None);
3. the caps of the other arms of each seed (``cap_steps``): the fewest post-training steps whose data (Mimg),
   network evaluations and wall time (reckoned at the CMT path's mid-training rate, a lower bound of any arm's)
   are each at least ``cap_factor`` times the same seed's CMT path's, to its last target (its whole run where it
   missed one); the vanilla ECT arm, shared by the methods, takes the larger of theirs. A seed is a replicate of
   the whole comparison: its arms are the same artifacts whatever the number of seeds;
4. the other arms, evaluated ``MAX_EVALUATIONS`` times over their cap at most (never more often than
   ``eval_every``), each stopping at its last target; consistency tuning halves ECT's dt ``ECT_STAGES`` times
   over the cap (``ect_schedule``), as ECT does over its run.

Post-training runs at a constant learning rate in this mode (``TARGET_MODE``), in every arm: a run to step k is then
the same whatever its cap (a decaying schedule would stretch with it), as ECT's reference loop keeps it
(locuslab/ect training/ct_training_loop.py:259-260). Every arm is a cached artifact: an interrupted run resumes
from the checkpoints of its unfinished arms.

Cost, by stage (``STAGES``), the teacher's pre-training reported apart (every arm that uses the teacher shares it):

* ``mimg``: data seen, in millions: mid-training's trajectory pairs and post-training's images (steps x batch);
  the rollouts start from noise and see none;
* ``nfe``: forward network evaluations: the rollouts' teacher calls (solver calls x trajectories), and per training
  sample the method's count (``Method.nfe``: ECD's teacher step and the CMT boundary's frozen model included, a JVP
  counted twice; backward passes not counted);
* ``wall_s``: seconds on this machine: the rollout stage's (its manifest's, every call that worked on it: a killed
  call's up to its last heartbeat, ``engine.CallTimer``), and the training loops' own up to the evaluation (its
  evaluations left out), added up over resumed calls (``comparison.cumulative_seconds``: the steps a killed call
  lost after its last checkpoint count once). The teacher's pre-training is its manifest's, like the rollouts'.
  Each arm's post-training seconds per step are reported beside its costs (``posttrain_seconds_per_step``): an arm
  that shared the cores with more work than the comparison's own workers shows a slower rate there, and its wall
  seconds are not comparable with the other arms'.

The saving of the CMT path against another arm is ``1 - cost(CMT) / cost(arm)`` per seed and unit (mean and std
over seeds); where the other arm never met the target, its cost at the cap stands in and the saving is a lower
bound (``"bound": "at_least"``). Each path is read at its first evaluation at or below the target, so where both
met it the saving is known only to within what the spacing of their evaluations allows (``reading_range``, in
parentheses in the ``.md``): an arm capped at tens of thousands of steps is evaluated every 1,000-2,000 steps,
which on digits brackets the diffusion path's crossing to within a fifth to a third of its cost. Results:
``savings_<preset>.json`` / ``.md`` / ``.png`` in ``cc.out_dir``.

Seeds apart: each seed is a replicate with its own teacher, caps and arms, so seeds can run on different machines
(or one after another, on a machine that keeps no artifacts between sittings). A run computes the seeds
``cc.run_seeds`` (default: all), writes each one's *record* (``seed_record``: the teacher's score, the targets'
values, every arm's settings and evaluations with their costs, the machine it ran on) to
``<out_dir>/savings_<preset>_seeds/seed_<k>.json``, and summarises every record of seeds 0 .. ``cc.seeds - 1``
found there that was made with the same settings (``settings``; another's is an error naming the field). Copy the
records of the other machines into that folder and any rerun summarises them all. Wall seconds are each seed's own
machine's (``machines`` in the summary): the savings are per seed, so a seed's arms are always timed on one
machine.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cmt_core.artifacts import read_manifest
from cmt_core.comparison import (
    ARM_COLOURS,
    INIT_NAMES,
    CompareConfig,
    Target,
    arm_config,
    evaluations,
    mean_std,
    number,
    parse_target,
    rollout_cost,
    run_distinct,
    run_jobs,
    training_nfe,
    write_report,
)
from cmt_core.config import PipelineConfig
from cmt_core.engine import StageResult
from cmt_core.errors import PreflightError, describe
from cmt_core.methods import get_method
from cmt_core.preflight import preflight
from cmt_core.runtime import uses_cuda
from cmt_core.solvers import function_evaluations
from cmt_core.stages import plan, teacher_score
from cmt_core.time_grids import make_grid

log = logging.getLogger("cmt")
STAGES = ("rollouts", "midtrain", "posttrain")
UNITS = ("mimg", "nfe", "wall_s")
MAX_EVALUATIONS = 40  # evaluations of a capped arm over its cap, at most
TARGET_MODE = ("posttrain.train.lr_schedule=constant",)
# ECT's dt halvings over a run: locuslab/ect run_ecm.sh, --duration 25.6 Mimg at --double 250 ticks of 12.8 kimg
ECT_STAGES = 8


def until_below(bounds: dict[str, float]) -> tuple[str, ...]:
    """The overrides of an arm in target mode: the constant learning rate and its early end at ``bounds``."""
    return (*TARGET_MODE, f"posttrain.train.until_below={json.dumps(bounds)}")


def ect_schedule(base: PipelineConfig, steps: int) -> tuple[str, ...]:
    """A consistency-tuning arm capped at ``steps`` (``base``: its config) halves ECT's dt ``ECT_STAGES`` times
    over its cap, as ECT's run halves it over its budget; at the presets' stage lengths a cap of tens of thousands
    of steps would reach stages where t - r is below float32's resolution of t and the loss is not finite."""
    if get_method(base.posttrain.method).section != "posttrain.ect":
        return ()
    return (f"posttrain.ect.stage_steps={math.ceil(steps / ECT_STAGES)}",)


def total(cost: dict, unit: str) -> float:
    """A cost's ``unit`` summed over its stages."""
    return sum(cost[unit].values())


def _point(stage: str, it: int, p: dict, cost: dict) -> dict:
    return {"stage": stage, "iter": it, "metric_1step": p["metric_1step"], "metric_2step": p["metric_2step"],
            "cost": cost}


def arm_path(cfg: PipelineConfig, stages: dict[str, StageResult], metric: str) -> list[dict]:
    """An arm's evaluations in order, each with the cost of its path so far by unit and stage (module docstring):
    for the CMT path the rollouts, mid-training's evaluations and then post-training's (after all of mid-training);
    for the others post-training's alone."""
    post_cfg = cfg.posttrain.train
    per_post = post_cfg.batch_size * training_nfe(cfg, "posttrain")
    upfront = {u: {} for u in UNITS}
    points = []
    if cfg.posttrain.init == "cmt":
        rollouts = rollout_cost(cfg, stages)
        upfront = {"mimg": {"rollouts": 0.0}, "nfe": {"rollouts": rollouts["nfe"]},
                   "wall_s": {"rollouts": rollouts["wall_s"]}}
        mid_cfg = cfg.midtrain.train
        per_mid = mid_cfg.batch_size * training_nfe(cfg, "midtrain")
        mid = evaluations(stages["midtrain"].path, metric)
        for it, p in sorted(mid.items()):
            points.append(_point("midtrain", it, p, {
                "mimg": {**upfront["mimg"], "midtrain": it * mid_cfg.batch_size / 1e6},
                "nfe": {**upfront["nfe"], "midtrain": it * per_mid},
                "wall_s": {**upfront["wall_s"], "midtrain": p["seconds"]}}))
        upfront = points[-1]["cost"]  # mid-training's last evaluation is its last step
    for it, p in sorted(evaluations(stages["posttrain"].path, metric).items()):
        points.append(_point("posttrain", it, p, {
            "mimg": {**upfront["mimg"], "posttrain": it * post_cfg.batch_size / 1e6},
            "nfe": {**upfront["nfe"], "posttrain": it * per_post},
            "wall_s": {**upfront["wall_s"], "posttrain": p["seconds"]}}))
    return points


def crossing(points: list[dict], target: Target, bound: float, stage: str | None = None) -> dict | None:
    """The first point (of ``stage`` only, when given) whose ``target.steps``-step metric is at or below ``bound``."""
    key = f"metric_{target.steps}step"
    return next((p for p in points if p[key] <= bound and stage in (None, p["stage"])), None)


def path_cost(points: list[dict], targets: list[Target], bounds: dict[str, float], metric: str) -> dict:
    """What a path cost until it met its last target (its whole run where it missed one)."""
    met = [crossing(points, t, bounds[t.key(metric)]) for t in targets]
    if any(p is None for p in met):
        return points[-1]["cost"]
    return max(met, key=lambda p: points.index(p))["cost"]


def sample_seconds(cfg: PipelineConfig, points: list[dict]) -> float:
    """The CMT path's measured mid-training seconds per training sample (its whole run, from its log): a lower
    bound of any other arm's per-sample time, each of whose steps runs at least mid-training's forward and backward
    pass of the same network (and more network evaluations besides), so a cap reckoned with it reaches at least
    its wall multiple (the summary reports the one reached, ``cap_multiple``)."""
    mid = [p for p in points if p["stage"] == "midtrain"][-1]
    return mid["cost"]["wall_s"]["midtrain"] / max(mid["iter"] * cfg.midtrain.train.batch_size, 1)


def cap_steps(cfg: PipelineConfig, cmt_cost: dict, factor: float, seconds_per_sample: float) -> int:
    """The fewest post-training steps of the arm ``cfg`` whose data, network evaluations and wall time (at most
    ``seconds_per_sample``, ``sample_seconds``) are each at least ``factor`` times ``cmt_cost`` (the CMT path's of
    the same seed). The rate is the CMT arm's, measured once and cached with it, so the cap (part of the arm's id)
    is the same on every rerun that reuses the CMT arm, and a seed's arms do not depend on the other seeds."""
    batch = cfg.posttrain.train.batch_size
    per_step = {"mimg": batch / 1e6, "nfe": batch * training_nfe(cfg, "posttrain"),
                "wall_s": batch * seconds_per_sample}
    return max(1, max(math.ceil(factor * total(cmt_cost, u) / per_step[u] - 1e-9) for u in UNITS if per_step[u] > 0))


def cadence(cap: int, eval_every: int, log_every: int) -> tuple[int, int]:
    """(evaluation cadence, cap rounded up to a multiple of it) for an arm capped at ``cap`` steps: at most
    ``MAX_EVALUATIONS`` evaluations, never more often than ``eval_every``, on logging steps."""
    every = max(eval_every, math.ceil(cap / MAX_EVALUATIONS))
    every = log_every * math.ceil(every / log_every)
    return every, every * math.ceil(cap / every)


def run_savings(cc: CompareConfig, report: Callable[[str], None] = log.info) -> dict:
    """Run the target-quality comparison (module docstring) for the seeds ``cc.computed_seeds()``, write each
    seed's record (``write_record``), then ``summarise`` every record of the same settings in ``cc.out_dir`` and
    ``write_results``."""
    if not cc.targets:
        raise ValueError("targets: the target-quality mode needs at least one target, e.g. '2step<=1.1x'")
    started = time.perf_counter()
    targets, seeds, first = [parse_target(t) for t in cc.targets], cc.computed_seeds(), cc.methods[0]
    load_records(cc)  # a record of other settings in out_dir fails the run before any arm starts
    for method in cc.methods:  # a missing file fails the comparison before any arm starts
        for init in cc.inits:
            resolved = plan(arm_config(cc, method, init, seeds[0]))
            preflight(resolved, resolved.needed(("posttrain",)))
    report(f"target-quality comparison {cc.preset}: targets {', '.join(t.name for t in targets)}; "
           f"{', '.join(cc.methods)} x {', '.join(cc.inits)} x seeds {', '.join(map(str, seeds))} of {cc.seeds}, "
           f"{cc.workers} worker(s)")
    run_jobs([(arm_config(cc, first, "cmt", s), ("rollouts",)) for s in seeds], cc.workers, report)
    teacher, metric = {}, None
    for s in seeds:
        cfg = arm_config(cc, first, "cmt", s)
        metric, teacher[s] = teacher_score(cfg, plan(cfg), torch.device("cuda" if uses_cuda(cfg.device) else "cpu"))
        report(f"seed {s}: teacher {metric} {teacher[s]:.4g}")
    bounds = {s: {t.key(metric): t.value(teacher[s]) for t in targets} for s in seeds}

    cmt = {(m, "cmt", s): arm_config(cc, m, "cmt", s, extra=until_below(bounds[s])) for m in cc.methods for s in seeds}
    results = run_distinct(cmt, cc.workers, report, stage=lambda cfg: "posttrain")
    paths = {key: arm_path(cfg, results[key], metric) for key, cfg in cmt.items()}
    caps = {}  # (method, init, seed) -> post-training cap; vanilla ECT's under method None: one run for every method
    for (method, _, s), cfg in cmt.items():
        cost = path_cost(paths[method, "cmt", s], targets, bounds[s], metric)
        rate = sample_seconds(cfg, paths[method, "cmt", s])
        for init in (i for i in cc.inits if i != "cmt"):
            key = (None if init == "ect" else method, init, s)
            arm = arm_config(cc, method, init, s, extra=TARGET_MODE)
            caps[key] = max(caps.get(key, 0), cap_steps(arm, cost, cc.cap_factor, rate))
    others = {}
    for method in cc.methods:
        for init in (i for i in cc.inits if i != "cmt"):
            for s in seeds:
                base = arm_config(cc, method, init, s)
                train = base.posttrain.train
                every, steps = cadence(caps[None if init == "ect" else method, init, s],
                                       cc.eval_every or train.eval_every or train.log_every, train.log_every)
                others[method, init, s] = arm_config(cc, method, init, s, steps=steps, eval_every=every,
                                                     extra=(*until_below(bounds[s]), *ect_schedule(base, steps)))
    report("caps: " + ", ".join(f"{m} {INIT_NAMES[i]} seed {s} {cfg.posttrain.train.steps} steps"
                                for (m, i, s), cfg in others.items()))
    results.update(run_distinct(others, cc.workers, report, stage=lambda cfg: "posttrain"))
    arms = {**cmt, **others}
    paths.update({key: arm_path(cfg, results[key], metric) for key, cfg in others.items()})
    for s in seeds:
        path = write_record(cc, seed_record(cc, s, metric, teacher[s], bounds[s], arms, paths, results))
        report(f"seed {s}: record {path}")
    records = load_records(cc)
    missing = sorted(set(range(cc.seeds)) - {r["seed"] for r in records})
    report(f"summary over seeds {', '.join(str(r['seed']) for r in records)}"
           + (f"; no record yet of seeds {', '.join(map(str, missing))} in {records_dir(cc)}" if missing else ""))
    summary = summarise(records)
    summary["seconds"] = {"this_run": time.perf_counter() - started,
                          "every_stage_once": sum(r["seconds_every_stage_once"] for r in records)}
    write_results(summary, cc.out_dir)
    return summary


# ------------------------------------------------------------------------------------------------ records


def settings(cc: CompareConfig) -> dict:
    """What makes two seeds' records parts of one comparison: every field of ``cc`` that changes an arm or a
    target (not the seeds, the workers or the folders)."""
    return cc.model_dump(mode="json", include={"preset", "methods", "inits", "targets", "cap_factor",
                                               "posttrain_steps", "eval_every", "overrides", "baseline_overrides"})


def machine(device: str) -> dict:
    """The machine a seed ran on (its wall seconds are this machine's): CPU model, cores, torch, accelerator."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if uses_cuda(device) else "cpu"}


def seed_record(cc: CompareConfig, seed: int, metric: str, teacher: float, bounds: dict[str, float],
                arms: dict[tuple, PipelineConfig], paths: dict[tuple, list[dict]],
                results: dict[tuple, dict[str, StageResult]]) -> dict:
    """One seed's replicate of the comparison, all ``summarise`` needs of it: the teacher's score and the targets'
    values, and per method and arm its settings and its evaluations with their costs (``arm_path``)."""
    cfg0 = arms[cc.methods[0], "cmt", seed]
    t = cfg0.teacher.train
    pretrain = cfg0.teacher.source == "pretrain"
    mine = [arm for (_, _, s), arm in results.items() if s == seed]
    unique = {(r.stage, r.artifact_id): r.manifest.get("seconds") or 0.0 for arm in mine for r in arm.values()}
    return {
        "settings": settings(cc), "seed": seed, "metric_name": metric, "bounds": bounds,
        "teacher": {"score": teacher, "nfe": _teacher_nfe(cfg0),
                    "pretraining": {"mimg": t.steps * t.batch_size / 1e6 if pretrain else 0.0,
                                    "nfe": t.steps * t.batch_size * training_nfe(cfg0, "teacher") if pretrain else 0,
                                    "wall_s": read_manifest(results[cc.methods[0], "cmt", seed]["teacher"].path)[
                                        "seconds"]}},
        "methods": {m: {"preset": cc.method_preset(m), "arms": {
            INIT_NAMES[i]: _arm_record(arms[m, i, seed], paths[m, i, seed]) for i in cc.inits}} for m in cc.methods},
        "seconds_every_stage_once": sum(unique.values()),
        "machine": machine(cfg0.device)}


def _arm_record(cfg: PipelineConfig, points: list[dict]) -> dict:
    """An arm's part of a seed record: its post-training settings and its evaluations with their costs."""
    train = cfg.posttrain.train
    return {"posttrain_method": cfg.posttrain.method, "init": cfg.posttrain.init, "posttrain_cap": train.steps,
            "eval_every": train.eval_every, "batch_size": train.batch_size,
            "posttrain_nfe_per_sample": training_nfe(cfg, "posttrain"), "points": points}


def records_dir(cc: CompareConfig) -> Path:
    """The folder of the seeds' records: ``<out_dir>/savings_<preset>_seeds``."""
    return Path(cc.out_dir) / f"savings_{cc.preset}_seeds"


def write_record(cc: CompareConfig, record: dict) -> Path:
    """``seed_<k>.json`` in ``records_dir``, written whole (a crash leaves the previous record)."""
    folder = records_dir(cc)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"seed_{record['seed']}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return path


def load_records(cc: CompareConfig) -> list[dict]:
    """The records of seeds 0 .. ``cc.seeds - 1`` in ``records_dir`` (computed here or on other machines), in seed
    order. A file that is not a seed's record, or a record made with other settings, is an error
    (``PreflightError``: bad input, found before any arm runs) naming the file and the first field that differs."""
    ours, out = settings(cc), []
    for seed in range(cc.seeds):
        path = records_dir(cc) / f"seed_{seed}.json"
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text())
        except ValueError as err:  # json's errors: plain data is read, nothing in the file runs
            raise PreflightError(f"{path}: not a seed record ({describe(err)}); remove it or rerun that seed") from None
        if not isinstance(record, dict) or record.get("seed") != seed or not isinstance(record.get("settings"), dict):
            raise PreflightError(f"{path}: not the record of seed {seed} (its 'seed' and 'settings' are those of "
                                 "seed_record); remove it or rerun that seed")
        theirs = record["settings"]
        for field in ours:
            if theirs.get(field) != ours[field]:
                raise PreflightError(f"{field}: {path} was made with {field}={theirs.get(field)!r}, this comparison "
                                     f"has {ours[field]!r}; rerun that seed with these settings, or write to another "
                                     "--out")
        out.append(record)
    return out


# ------------------------------------------------------------------------------------------------ summary


def _mean_std(values: list[float]) -> dict:
    return dict(zip(("mean", "std"), mean_std(values)))


def _by_stage(costs: list[dict]) -> dict:
    """The seed mean of costs, by unit and stage, with each unit's ``total``; a stage that some seeds' paths never
    entered (the CMT path met a target during mid-training in one seed and in post-training in another) counts 0
    in those seeds, so the stages add up to the total."""
    out = {}
    for unit in UNITS:
        stages = [s for s in STAGES if any(s in c[unit] for c in costs)]
        out[unit] = {s: statistics.fmean(c[unit].get(s, 0.0) for c in costs) for s in stages}
        out[unit]["total"] = statistics.fmean(total(c, unit) for c in costs)
    return out


def _arm_result(points_by_seed: list[list[dict]], target: Target, bound_by_seed: list[float]) -> dict:
    """One arm's result for one target: per seed where it met it (or its cap and best value), then the means."""
    per_seed = []
    key = f"metric_{target.steps}step"
    for points, bound in zip(points_by_seed, bound_by_seed):
        hit = crossing(points, target, bound)
        at = hit or points[-1]
        before = points[max(points.index(at) - 1, 0)]  # the crossing lies after it (``saving``'s reading range)
        per_seed.append({"reached": hit is not None, "stage": at["stage"], "iter": at["iter"],
                         "best": min(p[key] for p in points), "cost": at["cost"], "cost_before": before["cost"]})
    reached = [r for r in per_seed if r["reached"]]
    out = {"reached": len(reached) == len(per_seed), "reached_seeds": len(reached), "seeds": per_seed,
           "best": _mean_std([r["best"] for r in per_seed]),
           # every seed: its cost to the target, or its whole capped run where it missed it (then a lower bound)
           "cost_all_seeds": {**_by_stage([r["cost"] for r in per_seed]),
                              "bound": "exact" if len(reached) == len(per_seed) else "at_least"}}
    if reached:
        out["cost"] = _by_stage([r["cost"] for r in reached])
        out["cost_spread"] = {u: _mean_std([total(r["cost"], u) for r in reached])["std"] for u in UNITS}
    missed = [r for r in per_seed if not r["reached"]]
    if missed:  # "not reached at N": the cost of the whole capped run
        out["not_reached_at"] = {"iter": max(r["iter"] for r in missed), **_by_stage([r["cost"] for r in missed])}
    return out


def saving(cmt: dict, other: dict) -> dict | None:
    """The CMT path's saving against ``other`` per unit, seed by seed (``1 - cmt / other``); ``at_least`` where
    ``other`` never met the target in a seed (its capped cost stands in). None where CMT missed it in a seed.

    Each path is read at its first evaluation at or below the target, so it met the target somewhere after the
    evaluation before that one (``cost_before``). Where every seed of both paths met it, ``reading_range`` is the
    seed mean of the least and the largest saving those two readings of each path allow, ``1 - cmt / other_before``
    and ``1 - cmt_before / other`` (the crossing taken as the first time the metric falls to the target: a dip
    below it and back between two evaluations is not seen); None where ``other`` met it at its first evaluation."""
    if not all(r["reached"] for r in cmt["seeds"]):
        return None
    out = {}
    exact = all(o["reached"] for o in other["seeds"])
    for unit in UNITS:
        pairs = [(total(c["cost"], unit), total(o["cost"], unit)) for c, o in zip(cmt["seeds"], other["seeds"])]
        if any(o <= 0 for _, o in pairs):  # the other arm met it untrained: no saving to state
            out[unit] = None
            continue
        out[unit] = {**_mean_std([1.0 - c / o for c, o in pairs]), "bound": "exact" if exact else "at_least",
                     "per_seed": [{"saving": 1.0 - c / o, "bound": "exact" if r["reached"] else "at_least"}
                                  for (c, o), r in zip(pairs, other["seeds"])]}
        before = [(total(c["cost_before"], unit), total(o["cost_before"], unit))
                  for c, o in zip(cmt["seeds"], other["seeds"])]
        out[unit]["reading_range"] = None if not exact or any(ob <= 0 for _, ob in before) else {
            "low": statistics.fmean(1.0 - c / ob for (c, _), (_, ob) in zip(pairs, before)),
            "high": statistics.fmean(1.0 - cb / o for (_, o), (cb, _) in zip(pairs, before))}
    return out


def summarise(records: list[dict]) -> dict:
    """The results contract of ``savings_<preset>.json`` (module docstring), over the seeds' ``records`` (one
    comparison: ``load_records`` checked their settings)."""
    first, seeds = records[0], [r["seed"] for r in records]
    cs = first["settings"]
    targets, metric = [parse_target(t) for t in cs["targets"]], first["metric_name"]
    pre = first["teacher"]["pretraining"]
    out = {"preset": cs["preset"], "metric_name": metric, "seeds": seeds, "targets": [x.name for x in targets],
           "cap_factor": cs["cap_factor"],
           "teacher": {"nfe": first["teacher"]["nfe"],
                       "score": {**_mean_std([r["teacher"]["score"] for r in records]),
                                 "per_seed": [r["teacher"]["score"] for r in records]},
                       "pretraining": {"mimg": pre["mimg"], "nfe": pre["nfe"], "wall_s": statistics.fmean(
                           r["teacher"]["pretraining"]["wall_s"] for r in records)}},
           "methods": {},
           "machines": [{"seed": r["seed"], **r["machine"]} for r in records]}
    for method in cs["methods"]:
        arms = [r["methods"][method]["arms"] for r in records]  # per seed: arm name -> its record
        entry = {"preset": records[0]["methods"][method]["preset"],
                 "posttrain_method": arms[0]["cmt"]["posttrain_method"], "arms": {}, "targets": {}}
        cmt_costs = [path_cost(a["cmt"]["points"], targets, r["bounds"], metric) for a, r in zip(arms, records)]
        for name in (INIT_NAMES[i] for i in cs["inits"]):
            per_seed = [a[name] for a in arms]
            runs = [a["points"] for a in per_seed]
            entry["arms"][name] = {
                "posttrain_method": per_seed[0]["posttrain_method"], "init": per_seed[0]["init"],
                "posttrain_cap": [a["posttrain_cap"] for a in per_seed],
                "eval_every": [a["eval_every"] for a in per_seed],
                "stopped_at": [r[-1]["iter"] for r in runs],
                # the measured rate of each seed's post-training: a run that shared the cores shows up here
                "posttrain_seconds_per_step": [_rate(r) for r in runs],
                # the smallest over seeds of the cap's cost over the CMT path's (the cap rule: >= cap_factor)
                **({} if name == "cmt" else {"cap_multiple": {u: min(
                    _cap_cost(a, u) / max(total(cmt, u), 1e-12) for a, cmt in zip(per_seed, cmt_costs))
                    for u in UNITS}}),
                "final_cost": _by_stage([r[-1]["cost"] for r in runs]),
                "curves": [[{k: p[k] for k in ("stage", "iter", "metric_1step", "metric_2step")}
                            | {u: total(p["cost"], u) for u in UNITS} for p in r] for r in runs]}
        for target in targets:
            values = [r["bounds"][target.key(metric)] for r in records]
            per_arm = {name: _arm_result([a[name]["points"] for a in arms], target, values) for name in entry["arms"]}
            cmt_full = [crossing(a["cmt"]["points"], target, v, stage="posttrain") for a, v in zip(arms, values)]
            if all(cmt_full):  # the CMT path counted with the whole mid-training, whatever its checkpoints met
                per_arm["cmt"]["cost_with_full_midtrain"] = _by_stage([p["cost"] for p in cmt_full])
            entry["targets"][target.name] = {
                "value": {**_mean_std(values), "per_seed": values}, "arms": per_arm,
                "saving": {name: saving(per_arm["cmt"], arm) for name, arm in per_arm.items() if name != "cmt"}}
        out["methods"][method] = entry
    return out


def _rate(run: list[dict]) -> float | None:
    """Post-training wall seconds per step over a run (None where it has no post-training steps)."""
    post = [p for p in run if p["stage"] == "posttrain" and p["iter"] > 0]
    return post[-1]["cost"]["wall_s"]["posttrain"] / post[-1]["iter"] if post else None


def _teacher_nfe(cfg: PipelineConfig) -> int:
    return function_evaluations(cfg.teacher.sampler.name, make_grid(cfg.teacher.sampler))


def _cap_cost(arm: dict, unit: str) -> float:
    """What an arm's whole capped run (``arm``: its part of a seed record) costs in ``unit`` (mimg and nfe from the
    cap; wall seconds extrapolated from its own rate, as an arm that met its targets stopped before its cap)."""
    samples = arm["posttrain_cap"] * arm["batch_size"]
    if unit == "mimg":
        return samples / 1e6
    if unit == "nfe":
        return samples * arm["posttrain_nfe_per_sample"]
    return arm["posttrain_cap"] * (_rate(arm["points"]) or 0.0)


# ------------------------------------------------------------------------------------------------- output


def _span(values: list[int]) -> str:
    """``"a-b"``: the least and the largest of ``values`` (``"a"`` where they are equal)."""
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def _pct(s: dict | None) -> str:
    """A saving as ``mean% ± std``, ``≥`` where the other arm missed the target in every seed; where it missed it
    in some seeds only, the mean of the seeds' exact savings and lower bounds is a lower bound but their spread
    means nothing, so each seed's saving is listed instead."""
    if s is None:
        return "-"
    seeds = s.get("per_seed", [])
    if s["bound"] == "at_least" and any(r["bound"] == "exact" for r in seeds):
        return f"≥ {100 * s['mean']:.0f}% (per seed: " + ", ".join(
            ("≥ " if r["bound"] == "at_least" else "") + f"{100 * r['saving']:.0f}%" for r in seeds) + ")"
    text = f"{100 * s['mean']:.0f}% ± {100 * s['std']:.0f}"
    return ("≥ " if s["bound"] == "at_least" else "") + text


def _pct_range(s: dict | None) -> str:
    """``_pct``, with the range the evaluations' spacing allows (``saving``'s ``reading_range``) where there is one."""
    span = (s or {}).get("reading_range")
    return _pct(s) + ("" if span is None else f" ({100 * span['low']:.0f} to {100 * span['high']:.0f}%)")


def markdown(summary: dict) -> str:
    """The savings tables: per method and target, each path's cost by unit and the CMT path's saving."""
    metric, sec = summary["metric_name"], summary.get("seconds", {})
    pre = summary["teacher"]["pretraining"]
    lines = [f"# Savings at a target quality: `{summary['preset']}` ({len(summary['seeds'])} seeds, {metric})", "",
             f"Teacher: {metric} {number(summary['teacher']['score']['mean'])} ± "
             f"{number(summary['teacher']['score']['std'])} at {summary['teacher']['nfe']} NFE; its pre-training "
             f"({number(pre['mimg'])} Mimg, {number(pre['nfe'])} network evaluations, {number(pre['wall_s'])} s) is "
             f"shared by every arm and not counted below. Caps: at least {summary['cap_factor']:g}x the CMT path's "
             "data, network evaluations and wall time (each seed against its own CMT path). Each path is read at "
             "its first evaluation at or below a target; in parentheses after a saving, the least and the largest "
             "saving the spacing of the two paths' evaluations allows (each met the target after the evaluation "
             "before its reading).", "",
             "Wall seconds on: " + "; ".join(f"seed {m['seed']}: {m['cpu']}, {m['cores']} cores, {m['device']}, "
                                              f"torch {m['torch']}" for m in summary["machines"]) + ".", ""]
    if sec:
        lines += [f"Every stage once: {sec['every_stage_once'] / 60:.1f} min; this run {sec['this_run'] / 60:.1f} "
                  "min (complete artifacts reused).", ""]
    for method, entry in summary["methods"].items():
        lines += [f"## {method} (`{entry['preset']}`, post-training {entry['posttrain_method']})", "",
                  "| arm | post-training | cap (steps; range over seeds) | cap / CMT cost, least over seeds "
                  "(Mimg, NFE, wall) | post-training s / step, per seed |",
                  "| --- | --- | --- | --- | --- |"]
        for name, arm in entry["arms"].items():
            mult = arm.get("cap_multiple")
            lines.append(f"| {name} | {arm['posttrain_method']} from {arm['init']} | {_span(arm['posttrain_cap'])} | "
                         + ("-" if mult is None else ", ".join(f"{mult[u]:.1f}x" for u in UNITS)) + " | "
                         + ", ".join(number(r) for r in arm["posttrain_seconds_per_step"]) + " |")
        for tname, t in entry["targets"].items():
            lines += ["", f"### {tname} ({metric} <= {number(t['value']['mean'])})", "",
                      "| arm | reached (seeds) | best | Mimg | network evals | wall s (rollouts / mid / post) | "
                      "CMT saves: data | network evals | time |", "|" + " --- |" * 9]
            for name, arm in t["arms"].items():
                cost = arm["cost_all_seeds"]
                at = "" if arm["reached"] else "≥ "
                wall = " / ".join(number(cost["wall_s"].get(s)) for s in STAGES if s in cost["wall_s"])
                sv = t["saving"].get(name)
                missed = "" if arm["reached"] else f" (not reached at {arm['not_reached_at']['iter']})"
                lines.append(
                    f"| {name} | {arm['reached_seeds']}/{len(arm['seeds'])}{missed} | {number(arm['best']['mean'])} | "
                    f"{at}{number(cost['mimg']['total'])} | {at}{number(cost['nfe']['total'])} | "
                    f"{at}{number(cost['wall_s']['total'])} ({wall}) | "
                    + " | ".join(_pct_range(sv and sv[u]) for u in UNITS) + " |")
        lines += ["", f"![quality against cost](savings_{summary['preset']}.png)", ""]
    return "\n".join(lines) + "\n"


def readme_table(summary: dict) -> str:
    """The README's compact table: a row per method and target, each path's seed-mean cost (``≥`` where a seed
    missed the target: its capped run counts there) and the CMT path's saving against each other arm."""
    units = " / ".join(("Mimg", "network evals", "wall s"))
    present = [n for n in next(iter(summary["methods"].values()))["arms"] if n != "cmt"]  # every method's arms
    lines = [f"| method | target | CMT path: {units} | " + " | ".join(present)
             + " | CMT saves (data / network evals / time) vs " + ", ".join(present) + " |",
             "|" + " --- |" * (4 + len(present))]
    for method, entry in summary["methods"].items():
        for tname, t in entry["targets"].items():
            cells = []
            for name in ("cmt", *present):
                arm = t["arms"][name]
                cost, at = arm["cost_all_seeds"], "" if arm["reached"] else "≥ "
                text = at + " / ".join(number(cost[u]["total"]) for u in UNITS)
                if not arm["reached"]:
                    caps = [r["iter"] for r in arm["seeds"] if not r["reached"]]
                    text += (f" ({arm['reached_seeds']}/{len(arm['seeds'])} seeds reached, cap {_span(caps)} steps; "
                             f"best {number(arm['best']['mean'])})")
                cells.append(text)
            saves = "; ".join(" / ".join(_pct(t["saving"][n] and t["saving"][n][u]) for u in UNITS) for n in present)
            lines.append(f"| {method} ({entry['posttrain_method']}) | {tname} ({number(t['value']['mean'])}) | "
                         + " | ".join(cells) + f" | {saves} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, out_dir: Path) -> Path:
    """Quality against cumulative wall seconds per path (log axes), one panel per method and step count, each
    seed a line, the targets drawn (their mean over the seeds, shaded from the lowest seed's to the highest's)."""
    from cmt_core.evaluation.report import plt

    methods = list(summary["methods"])
    fig, axes = plt.subplots(len(methods), 2, figsize=(10, 3.6 * len(methods)), squeeze=False)
    for row, method in zip(axes, methods):
        entry = summary["methods"][method]
        for ax, steps in zip(row, (1, 2)):
            key = f"metric_{steps}step"
            for name, arm in entry["arms"].items():
                for k, curve in enumerate(arm["curves"]):
                    points = [p for p in curve if p["wall_s"] > 0]
                    ax.plot([p["wall_s"] for p in points], [p[key] for p in points], color=ARM_COLOURS[name],
                            lw=1, alpha=0.8, marker="o", ms=2, label=name if k == 0 else None)
            for tname, t in entry["targets"].items():
                if tname.startswith(f"{steps}step"):
                    ax.axhline(t["value"]["mean"], color="k", ls="--", lw=1, label=f"target {tname}")
                    low, high = min(t["value"]["per_seed"]), max(t["value"]["per_seed"])
                    if high > low:  # relative targets differ with each seed's teacher
                        ax.axhspan(low, high, color="k", alpha=0.12, lw=0, label="its range over the seeds")
            ax.set(xscale="log", yscale="log", xlabel="cumulative wall seconds (rollouts + mid + post-training)",
                   ylabel=f"{steps}-step {summary['metric_name']}", title=f"{summary['preset']} {method}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out_dir) / f"savings_{summary['preset']}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(summary: dict, out_dir: Path) -> Path:
    """``savings_<preset>.json``, ``.md`` and ``.png`` into ``out_dir``; returns the markdown file."""
    return write_report(summary, out_dir, "savings", plot, markdown)
