"""The training loop shared by every stage (teacher, mid-training, post-training).

``train(model, objective, source, cfg, run_dir, runtime)`` optimises ``model`` (a preconditioned
module) on batches ``source.batch(step, ...)`` and resumes from ``run_dir/checkpoint.pt`` when it exists.
One optimisation step is ``train_step`` (the step's seeds and learning rate, the objective under autocast, the
backward pass, DDP gradient averaging for JVP objectives, the non-finite guard, clipping, the optimizer and the
EMA): the loop adds batches, logging, evaluations and checkpoints around it, and benchmarks call it alone.
``cfg`` is a ``TrainConfig`` (read as plain values: steps, batch_size, lr, schedule, EMA, clipping, cadences).
Every random number of step k is a function of (seed, k, global sample), so N steps, a resume and N more
steps give the same weights as 2N steps straight, on one process or on DDP ranks.

Checkpoints (``cmt_core.checkpoint``): model, EMA, optimizer, step and best score every
``cfg.checkpoint_every`` steps; the log rows after the checkpoint a run resumes from are dropped. A row's
``seconds`` is the wall time since this call began, taken before the row's own evaluation, ``eval_seconds`` the
time this call spent evaluating, the row's own evaluation included; the rows of a resumed call also say
``resumed_from`` (the step of its checkpoint), so a run's time adds up over its calls.
``cfg.label_dropout`` > 0: the batches' class labels are dropped to the unconditional class at that rate
(``cmt_core.data.sources.LabelDropout``, seeded by ``cfg.seed`` and the step).

Event log: with ``events`` (``cmt_core.events.EventLog``) every log row also goes to the run's TensorBoard event
files, which drop their events after the checkpoint a run resumes from as the log drops its rows; they are closed
when the call ends or fails, and change nothing the run computes (no random number, no weight).

Safety: a non-finite loss stops the run with ``NonFiniteLossError`` and the last good checkpoint is left
untouched; with ``evaluate`` the EMA model is scored at 1 and 2 steps every ``cfg.eval_every`` steps (and at
step 0), and the one ``cfg.keep`` selects (``selection_score``) is kept in ``best.pt`` and returned, so a run
never ends worse than its best evaluation (with ``keep="both"``: never worse than its start on either).

Early end: with ``cfg.until_below`` (score name -> bound) the run ends at the first evaluation by which every named
score has been at or below its bound (``targets_met``), checkpointed there; a resumed run whose kept rows already
meet them trains no further.

EMA: ``cfg.ema_decay``'s exponential EMA, or with ``cfg.ema_stds`` EDM2's power-function EMAs of those relative
stds (``cmt_core.phema``; training progress counted in steps), all of them in the checkpoint's ``ema`` field.
``cfg.ema_snapshot_every``: every tracked EMA is written every that many steps and at the last step to
``run_dir/phema/ema-<step>.pt`` (``snapshot_path``), from which ``posthoc_ema`` reconstructs the EMA of any std
at a snapshot's step. The EMA model that is scored, kept and returned ("the scored EMA") is the power-function
EMA of the first std, or with ``cfg.posthoc_std`` its post-hoc reconstruction from the snapshots up to that step
(evaluations fall on snapshot steps; at step 0 every EMA is the initial model).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from cmt_core.checkpoint import (
    BEST_FILE,
    CHECKPOINT_FILE,
    LOG_FILE,
    CheckpointError,
    CheckpointIO,
    atomic_save,
    load_file,
    read_training_log,
)
from cmt_core.data.sources import BatchSource, LabelDropout, move_batch
from cmt_core.ema import EMA, make_ema
from cmt_core.events import EventLog
from cmt_core.objectives.base import StepRandom
from cmt_core.phema import PowerFunctionEMA, combine_state_dicts, solve_posthoc_coefficients
from cmt_core.rng import Stream, seed_of
from cmt_core.runtime import Runtime

logger = logging.getLogger("cmt")
# EMA model -> metrics with "score_1step" and "score_2step" keys (lower is better), see ``selection_score``
Evaluate = Callable[[nn.Module], dict]
Progress = Callable[[int, int, dict], None]  # (done, total, latest metrics) of a stage, for dashboards


class NonFiniteLossError(RuntimeError):
    """A step's loss is not finite; nothing of the step was applied (weights, optimizer and EMA are untouched)."""


@dataclass
class TrainResult:
    model: nn.Module  # the scored EMA's weights: the best evaluated ones when ``evaluate`` was given, else the last
    best_step: int | None = None
    best_score: float | None = None  # its ``selection_score``
    best_metrics: dict = field(default_factory=dict)  # its evaluation
    history: list[dict] = field(default_factory=list)


def learning_rate(cfg, step: int) -> float:
    """Warm-up then constant / linear / cosine decay to ``final_lr_fraction * lr``, or EDM2's inverse square root
    decay ``lr / sqrt(max(step / lr_decay_steps, 1))``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "rsqrt":
        return cfg.lr / math.sqrt(max(step / cfg.lr_decay_steps, 1.0))
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    low = cfg.final_lr_fraction
    if cfg.lr_schedule == "linear":
        return cfg.lr * (1 - (1 - low) * progress)
    if cfg.lr_schedule == "cosine":
        return cfg.lr * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress)))
    return cfg.lr


def selection_score(keep: str, metrics: dict, start: dict, tolerance: float = 0.0) -> float:
    """How good an evaluation is for ``keep`` (lower is better; inf: never kept), ``start`` the step-0 one.

    ``one_step`` / ``two_step``: that score. ``both``: ``score_1step / start_1step + score_2step / start_2step``
    when neither score exceeds its step-0 value by more than the relative ``tolerance`` (the evaluation's noise),
    else inf; step 0 itself scores 2, so it is kept when no later evaluation beats it."""
    keys = ("score_1step", "score_2step")
    if keep == "one_step":
        return float(metrics["score_1step"])
    if keep == "two_step":
        return float(metrics["score_2step"])
    if keep != "both":
        raise ValueError(f"keep must be one_step, two_step or both, got {keep!r}")
    if any(metrics[k] > start[k] * (1 + tolerance) for k in keys):
        return math.inf
    return float(sum(metrics[k] / max(start[k], 1e-12) for k in keys))


def targets_met(history: list[dict], bounds: dict[str, float]) -> bool:
    """Whether every score of ``bounds`` (an evaluation's key: ``score_2step``, ``fd_digits_1step``, ...) has been
    at or below its bound at some evaluation of ``history`` (log rows; an evaluation's scores are ``eval_<name>``)."""
    return bool(bounds) and all(any(row.get(f"eval_{name}", math.inf) <= bound for row in history)
                                for name, bound in bounds.items())


def _check_bounds(row: dict, bounds: dict[str, float]) -> None:
    """``bounds`` names only scores the evaluation (``row``, a logged one) returns: a misspelt one is never met."""
    unknown = [name for name in bounds if f"eval_{name}" not in row]
    if unknown:
        known = sorted(k[len("eval_"):] for k in row if k.startswith("eval_") and k.endswith("step"))
        raise ValueError(f"train.until_below names {', '.join(map(repr, unknown))}, which the evaluation does not "
                         f"return; it returns {', '.join(known)}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def resume_problem(values: dict, steps: int) -> str | None:
    """What makes a checkpoint's plain fields unusable for a run of ``steps`` steps (they come from a file: a step
    outside the run, a best-model record of another shape), or None."""
    step, best = values.get("step"), values.get("best")
    if not _is_int(step) or not 0 <= step <= steps:
        return f"field step={str(step)[:40]} is not a step of this run (0 to {steps})"
    if not isinstance(best, dict) or set(best) != {"step", "score", "start"}:
        return "field best is not a record of step, score and start"
    if best["step"] is not None and not (_is_int(best["step"]) and 0 <= best["step"] <= step):
        return f"field best.step={str(best['step'])[:40]} is not a step before {step}"
    if not isinstance(best["score"], (int, float)) or isinstance(best["score"], bool) or math.isnan(best["score"]):
        return "field best.score is not a number"
    start = best["start"]
    scores = ("score_1step", "score_2step")
    if start is not None and not (isinstance(start, dict) and all(
            isinstance(start.get(k), (int, float)) and math.isfinite(start[k]) for k in scores)):
        return "field best.start is not a record of two finite scores"
    return None


def make_optimizer(cfg, params) -> torch.optim.Optimizer:
    kind = torch.optim.RAdam if cfg.optimizer == "radam" else torch.optim.Adam
    return kind(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def train_step(model: nn.Module, objective, batch: dict, cfg, step: int, opt: torch.optim.Optimizer,
               ema: EMA | PowerFunctionEMA, runtime: Runtime, wrapped: nn.Module | None = None) -> tuple[float, float]:
    """Optimisation step ``step`` of ``model`` on this rank's ``batch`` (on the device); returns the loss averaged
    over ranks and the gradient norm before clipping.

    Every random number is the step's: the torch seed (dropout masks) from (seed, step, rank), the objective's
    draws from ``StepRandom`` for the global batch. ``wrapped``: the DDP wrapper the objective calls (an objective
    with ``uses_jvp`` gets the bare module and its gradients are averaged here). A non-finite loss raises
    ``NonFiniteLossError`` before anything is updated."""
    torch.manual_seed(seed_of(Stream.STEP_TORCH, cfg.seed, step, runtime.rank))
    for group in opt.param_groups:
        group["lr"] = learning_rate(cfg, step)
    uses_jvp = getattr(objective, "uses_jvp", False)
    rng = StepRandom(cfg.seed, step, cfg.batch_size, runtime.rank, runtime.world, runtime.device)
    with runtime.autocast():
        loss = objective(model if uses_jvp or wrapped is None else wrapped, batch, rng).float().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if runtime.distributed and uses_jvp:
        for p in model.parameters():
            if p.grad is not None:
                runtime.all_reduce_mean(p.grad)
    reported = runtime.all_reduce_mean(loss.detach().clone())
    if not torch.isfinite(reported):
        raise NonFiniteLossError(f"non-finite loss {reported.item()} at step {step}")
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
    opt.step()
    ema.update(model, step + 1)
    return reported.item(), float(grad_norm)


SNAPSHOT_DIR = "phema"
_SNAPSHOT_NAME = re.compile(r"ema-(\d{9})\.pt")


def snapshot_path(run_dir: Path, step: int) -> Path:
    """Where the snapshot of every tracked power-function EMA after ``step`` steps lives:
    ``run_dir/phema/ema-<step, 9 digits>.pt``, a ``torch.save`` file of ``{"step": int, "stds": [float, ...],
    "emas": [state dict per std], "buffers": [names of the keys an EMA copies rather than averages]}``."""
    return Path(run_dir) / SNAPSHOT_DIR / f"ema-{step:09d}.pt"


def snapshot_steps(run_dir: Path) -> list[int]:
    """The steps of the snapshots under ``run_dir``, in increasing order."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    found = (_SNAPSHOT_NAME.fullmatch(p.name) for p in folder.iterdir())
    return sorted(int(m.group(1)) for m in found if m is not None)


def save_snapshot(run_dir: Path, step: int, ema: PowerFunctionEMA) -> None:
    """Write the snapshot of every EMA of ``ema`` after ``step`` steps, atomically (``snapshot_path``)."""
    snapshot_path(run_dir, step).parent.mkdir(exist_ok=True)
    atomic_save({"step": step, "stds": list(ema.stds), "emas": [m.state_dict() for m in ema.models],
                 "buffers": [name for name, _ in ema.model.named_buffers()]}, snapshot_path(run_dir, step))


def _read_snapshot(path: Path, step: int, stds: list[float] | None, map_location) -> dict:
    """A snapshot file, its fields checked (it is read from a file anyone may have edited); ``CheckpointError``
    naming it when it is not the snapshot of ``step`` of the EMAs of ``stds`` (None: any)."""
    blob = load_file(path, map_location)
    if not isinstance(blob, dict) or set(blob) != {"step", "stds", "emas", "buffers"}:
        raise CheckpointError(f"{path} is not an EMA snapshot (step, stds, emas, buffers)")
    found = blob["stds"]
    if blob["step"] != step or not _is_int(blob["step"]):
        raise CheckpointError(f"{path} holds step {str(blob['step'])[:40]}, its name says {step}")
    if not (isinstance(found, list) and found and all(isinstance(s, float) for s in found)
            and isinstance(blob["emas"], list) and len(blob["emas"]) == len(found)
            and all(isinstance(e, dict) for e in blob["emas"])):
        raise CheckpointError(f"{path} does not hold one EMA state dict per std")
    if stds is not None and found != stds:
        raise CheckpointError(f"{path} holds the EMAs of stds {str(found)[:80]}, the other snapshots {stds}")
    if not (isinstance(blob["buffers"], list) and all(isinstance(b, str) for b in blob["buffers"])):
        raise CheckpointError(f"{path}: field buffers is not a list of names")
    return blob


def posthoc_ema(run_dir: Path, std: float, step: int | None = None, steps: list[int] | None = None,
                map_location="cpu") -> dict:
    """The state dict of the power-function EMA of relative std ``std`` after ``step`` steps (None: the last
    snapshot's), reconstructed from the EMA snapshots of the run in ``run_dir`` (``snapshot_path``) by
    ``cmt_core.phema.solve_posthoc_coefficients`` / ``combine_state_dicts``.

    ``steps``: the snapshots used (None: every one at or before ``step``); one must be at ``step``. Every snapshot
    must hold the EMAs of the same stds. A missing snapshot raises ``FileNotFoundError``, a damaged or foreign one
    ``CheckpointError``, both naming the file."""
    if steps is None:
        available = snapshot_steps(run_dir)
        if step is None and not available:
            raise FileNotFoundError(f"no EMA snapshots in {Path(run_dir) / SNAPSHOT_DIR}")
        step = available[-1] if step is None else step
        steps = [s for s in available if s <= step]
    steps = sorted(steps)
    if not steps:
        raise FileNotFoundError(f"no EMA snapshots at or before step {step} in {Path(run_dir) / SNAPSHOT_DIR}")
    step = steps[-1] if step is None else step
    if step not in steps or steps[0] < 1 or steps[-1] > step:
        raise ValueError(f"reconstructing after step {step} needs a snapshot at that step and none after it "
                         f"(steps >= 1), got snapshots at {steps[:5]}...{steps[-3:]}")
    for s in steps:
        if not snapshot_path(run_dir, s).is_file():
            raise FileNotFoundError(f"EMA snapshot {snapshot_path(run_dir, s)} is missing: post-hoc EMA after "
                                    f"step {step} needs it")
    held = [_read_snapshot(snapshot_path(run_dir, steps[0]), steps[0], None, map_location)]
    stds, buffers = held[0]["stds"], held[0]["buffers"]
    in_ofs, in_std = np.repeat(steps, len(stds)), np.tile(stds, len(steps))
    coefficients = solve_posthoc_coefficients(in_ofs, in_std, step, std)[:, 0]

    def state_dicts():  # one snapshot file in memory at a time
        for s in steps:
            blob = held.pop() if held else _read_snapshot(snapshot_path(run_dir, s), s, stds, map_location)
            yield from blob["emas"]

    try:
        return combine_state_dicts(state_dicts(), coefficients, copy_keys=buffers)
    except ValueError as err:
        raise CheckpointError(f"EMA snapshots in {Path(run_dir) / SNAPSHOT_DIR} do not fit together: {err}") \
            from err


def train(model: nn.Module, objective, source: BatchSource, cfg, run_dir: Path,
          runtime: Runtime, evaluate: Evaluate | None = None, desc: str = "train",
          progress: Progress | None = None, until: int | None = None, events: EventLog | None = None) -> TrainResult:
    """Train ``model`` in place; returns the EMA model (see the module docstring).

    ``until`` ends this call after that many steps (a slice of the run: checkpointed, resumable); ``events``: the
    event log each row also goes to."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.label_dropout:
        source = LabelDropout(source, cfg.label_dropout, cfg.seed)
    model.to(runtime.device).train()
    ema = make_ema(model, cfg.ema_decay, cfg.ema_stds)
    power = isinstance(ema, PowerFunctionEMA)
    opt = make_optimizer(cfg, model.parameters())
    ckpt_path, best_path, log_path = run_dir / CHECKPOINT_FILE, run_dir / BEST_FILE, run_dir / LOG_FILE
    checkpoint = CheckpointIO(model=model, ema=ema if power else ema.model, optimizer=opt)
    start, best = 0, {"step": None, "score": math.inf, "start": None}
    resumed = checkpoint.load(ckpt_path, map_location=runtime.device, check=lambda v: resume_problem(v, cfg.steps))
    if resumed is not None:
        start, best = resumed["step"], resumed["best"]
        logger.info("%s: resuming from step %d of %d (%s)", desc, start, cfg.steps, run_dir)
    saved = {"step": start if resumed is not None else None}  # the last checkpoint on disk
    # the rows up to the checkpoint resumed from; none without one (the step-0 evaluation is logged again)
    history = read_training_log(log_path, up_to=start if resumed is not None else -1)
    if runtime.is_main:  # drop lines (and EMA snapshots) written after the checkpoint we resume from
        log_path.write_text("".join(json.dumps(r) + "\n" for r in history))
        for late in (s for s in snapshot_steps(run_dir) if s > start):
            snapshot_path(run_dir, late).unlink()
    every = cfg.ema_snapshot_every if power else None
    posthoc = {"module": None}  # the module the post-hoc EMA is loaded into

    def snapshots_until(step: int) -> list[int]:
        return [*range(every, step + 1, every), *([step] if step % every else [])]

    def scored_model(step: int) -> nn.Module:
        """The scored EMA after ``step`` steps (see the module docstring)."""
        if cfg.posthoc_std is None or step == 0:
            return ema.model
        runtime.barrier()  # the main process wrote the snapshots
        state = posthoc_ema(run_dir, cfg.posthoc_std, step, snapshots_until(step), map_location=runtime.device)
        if posthoc["module"] is None:
            posthoc["module"] = copy.deepcopy(ema.model)
        posthoc["module"].load_state_dict(state)
        return posthoc["module"]

    wrapped = model
    if runtime.distributed and not getattr(objective, "uses_jvp", False):
        devices = [runtime.device.index] if runtime.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=devices)

    def save_checkpoint(step: int) -> None:
        if runtime.is_main:
            checkpoint.save(ckpt_path, step=step, best=best)
        saved["step"] = step
        runtime.barrier()

    def run_evaluation(step: int) -> dict:
        started = time.perf_counter()
        scored = scored_model(step)
        metrics = {k: float(v) for k, v in evaluate(scored).items()}
        spent["eval"] += time.perf_counter() - started
        if best["start"] is None:
            best["start"] = {k: metrics[k] for k in ("score_1step", "score_2step")}
        score = selection_score(cfg.keep, metrics, best["start"], cfg.keep_tolerance)
        if score < best["score"]:
            best.update(step=step, score=score)
            if runtime.is_main:
                atomic_save({"ema": scored.state_dict(), "step": step, "metrics": metrics}, best_path)
        return {f"eval_{k}": v for k, v in metrics.items()}

    def log(row: dict) -> None:
        history.append(row)
        if runtime.is_main:
            with log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if events is not None:
            events.write(row)
        if progress is not None:
            progress(row["step"], cfg.steps, row)

    t0, spent = time.perf_counter(), {"eval": 0.0}
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, disable=not runtime.is_main, dynamic_ncols=True)
    running = []
    stop = cfg.steps if until is None else min(until, cfg.steps)
    bounds = cfg.until_below if evaluate is not None else {}  # (read only by loops that evaluate)
    if events is not None:  # the rows after the checkpoint are dropped, the checkpoint's own are kept
        events.open(start + 1 if resumed is not None else 0)
    try:  # the bar and the event log are closed before a failure is reported
        if evaluate is not None and start == 0 and cfg.steps > 0:
            log({"step": 0, **run_evaluation(0), "eval_seconds": spent["eval"]})
            _check_bounds(history[-1], bounds)
        if targets_met(history, bounds):  # met at the start, or before the checkpoint resumed from
            stop = start
        for step in range(start, stop):
            batch = move_batch(source.batch(step, cfg.batch_size, runtime.rank, runtime.world), runtime.device)
            try:
                loss, grad_norm = train_step(model, objective, batch, cfg, step, opt, ema, runtime, wrapped)
            except NonFiniteLossError as err:
                where = f"{ckpt_path} (step {saved['step']})" if saved["step"] is not None else "none written yet"
                raise NonFiniteLossError(f"{desc}: {err}; last good checkpoint kept: {where}. Lower train.lr or "
                                         "raise grad_clip.") from None
            running.append(loss)
            done = step + 1
            if every is not None and runtime.is_main and (done % every == 0 or done == cfg.steps):
                save_snapshot(run_dir, done, ema)
            if done % cfg.log_every == 0 or done == cfg.steps:
                row = {"step": done, "loss": sum(running) / len(running), "lr": opt.param_groups[0]["lr"],
                       "grad_norm": grad_norm, "seconds": time.perf_counter() - t0}
                running = []
                if evaluate is not None and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                    row.update(run_evaluation(done))
                if evaluate is not None:
                    row["eval_seconds"] = spent["eval"]
                if resumed is not None:
                    row["resumed_from"] = start
                log(row)
                bar.set_postfix(loss=f"{row['loss']:.4g}")
                if "eval_score_1step" in row and targets_met(history, bounds):
                    logger.info("%s: every bound of until_below %s met at step %d of %d", desc, bounds,
                                done, cfg.steps)
                    stop = done
            bar.update(1)
            if done % cfg.checkpoint_every == 0 or done == stop:
                save_checkpoint(done)
            if done == stop:
                break
    finally:
        bar.close()
        if events is not None:
            events.close()

    kept = None
    if evaluate is not None and best["step"] is not None and best_path.exists():
        kept = load_file(best_path, map_location=runtime.device)
    final = ema.model
    if kept is None and cfg.posthoc_std is not None and stop == cfg.steps:
        final = scored_model(stop)  # the post-hoc EMA at the end of the run
    result = TrainResult(final, history=history)
    if evaluate is not None and best["step"] is not None:
        if kept is not None:
            final.load_state_dict(kept["ema"])
            result.best_metrics = kept["metrics"]
        result.best_step, result.best_score = best["step"], best["score"]
    return result
