"""Progress of a long run, read from its artifact folders while it trains: ``watch(plan, runtime)``.

For each training stage of the run's plan it reports the stage's state and scores its model:

* ``finished``: the artifact is complete; the kept model (``model.pt``) is scored, at its stage's 2-step sigma;
* ``running`` (another process holds the artifact's lock) or ``stopped`` (nobody does: a run that was interrupted
  and not resumed yet): the EMA weights of the latest checkpoint (``train/checkpoint.pt``: the exponential EMA, or
  the power-function EMA of the first std) are scored, 2-step at ``eval.mid_sigma`` (a running stage has not chosen
  its sigma yet);
* ``not started``: no checkpoint yet; nothing is scored;
* ``damaged``: a manifest that is not one (``error`` names it); the other stages are still scored.

Few-step models (mid- and post-training) are scored at 1 and 2 steps by the stage's own ``Scorer`` (the same
noises, metrics and names as the training log's evaluations); a teacher pre-trained here by its ODE sampler
(``teacher.sampler``). The guide of autoguidance reports its progress only. Nothing is written into the artifact
folders and no stage is started: a run in progress is only read (the checkpoint is replaced atomically by the run,
so a read sees the old one or the new one).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from cmt_core.artifacts import LOCK_SUFFIX, MODEL_FILE, ManifestError, read_manifest
from cmt_core.checkpoint import CHECKPOINT_FILE, CheckpointError, load_file, previous, read_training_log
from cmt_core.engine import Plan, complete_result
from cmt_core.errors import describe
from cmt_core.models import build_model, load_model
from cmt_core.runtime import Runtime
from cmt_core.stages import (
    PIPELINE,
    TRAINING_STAGES,
    denoiser_network,
    few_step_network,
    method_of,
    stage_data,
    stage_scorer,
)


def is_locked(folder: Path) -> bool:
    """Whether a process holds the lock of the artifact folder ``folder`` (``cmt_core.artifacts.artifact_lock``)."""
    from filelock import FileLock, Timeout

    lock_file = Path(str(folder) + LOCK_SUFFIX)
    if not lock_file.exists():
        return False
    lock = FileLock(str(lock_file))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def _checkpoint_ema(path: Path) -> tuple[dict, int]:
    """The scored EMA's state dict and the step of the latest training checkpoint at ``path``: the run replaces it
    by moving it to ``previous(path)`` and publishing the new one, so between the two the previous one is read."""
    try:
        blob = load_file(path)
    except FileNotFoundError:
        path = previous(path)
        blob = load_file(path)
    ema, step = blob.get("ema") if isinstance(blob, dict) else None, blob.get("step")
    if isinstance(ema, dict) and isinstance(ema.get("emas"), list):  # power-function EMAs: the first std's
        ema = ema["emas"][0]
    if not isinstance(ema, dict) or not isinstance(step, int):
        raise CheckpointError(f"{path} is not a training checkpoint (ema, step)")
    return ema, step


def _state(plan: Plan, stage: str) -> tuple[str, Path, dict | None]:
    """The stage's state (module docstring), its folder and its manifest (None unless finished)."""
    folder = plan.path(stage)
    manifest = read_manifest(folder)
    if manifest is not None:
        return "finished", folder, manifest
    checkpoint = folder / "train" / CHECKPOINT_FILE
    if not (checkpoint.exists() or previous(checkpoint).exists()):
        return "not started", folder, None
    return ("running" if is_locked(folder) else "stopped"), folder, None


def _model(plan: Plan, stage: str, folder: Path, manifest: dict | None, shape) -> tuple[torch.nn.Module, int | None,
                                                                                         float]:
    """The model to score (the kept one of a finished stage, whose ``manifest`` is given, else the EMA of the latest
    checkpoint), the step it is from and its 2-step sigma."""
    c = plan.cfg
    if manifest is not None:
        metrics = manifest["metrics"]
        return load_model(folder / MODEL_FILE), metrics.get("best_step"), metrics.get("mid_sigma", c.eval.mid_sigma)
    method = method_of(c, stage)
    network = denoiser_network(c) if method.kind == "denoiser" else few_step_network(c)
    model = build_model(method.kind, network, shape, None if method.kind == "denoiser" else
                        c.rollout.solver.sigma_min)
    ema, step = _checkpoint_ema(folder / "train" / CHECKPOINT_FILE)
    model.load_state_dict(ema)
    return model.eval(), step, c.eval.mid_sigma


def _train_cfg(plan: Plan, stage: str):
    c = plan.cfg
    return {"teacher": c.teacher.train, "guide": c.guidance.guide.train, "midtrain": c.midtrain.train,
            "posttrain": c.posttrain.train}[stage]


def watch(plan: Plan, runtime: Runtime) -> list[dict]:
    """One row per training stage of ``plan`` (module docstring): ``stage``, ``state``, ``step`` / ``steps``,
    the last logged ``loss``, ``scored`` (``checkpoint <step>``, ``kept model``) and the metrics, e.g.
    ``FD-digits_1step``, ``FD-digits_2step`` (a teacher: ``<metric>_teacher``); ``error`` when its files could not
    be read."""
    c = plan.cfg
    encoder = {"encoder": plan.path("encoder")} if c.data.encoder.kind != "identity" else {}
    data = None if encoder and complete_result(plan, "encoder") is None else stage_data(c, encoder)
    scorer = None
    rows = []
    for stage in (s for s in plan.needed(PIPELINE) if s in TRAINING_STAGES):
        try:
            state, folder, manifest = _state(plan, stage)
        except ManifestError as err:  # a manifest there that is not one: named in the row, the others still scored
            rows.append({"stage": stage, "artifact_id": plan.ids[stage], "state": "damaged", "step": None,
                         "steps": _train_cfg(plan, stage).steps, "error": str(err)})
            continue
        log = read_training_log(folder)
        row = {"stage": stage, "artifact_id": plan.ids[stage], "state": state,
               "step": log[-1]["step"] if log else 0, "steps": _train_cfg(plan, stage).steps,
               "loss": next((r["loss"] for r in reversed(log) if "loss" in r), math.nan)}
        rows.append(row)
        if state == "not started" or stage == "guide" or (state == "finished" and not (folder / MODEL_FILE).exists()):
            continue  # nothing to score: the guide, or a teacher without weights of ours (exact, TorchScript)
        if data is None:
            row["error"] = "the latent space's encoder is not trained yet: nothing can be decoded to score"
            continue
        try:
            model, step, mid = _model(plan, stage, folder, manifest, data.model_shape)
        except (CheckpointError, OSError, RuntimeError, ValueError, KeyError) as err:
            row["error"] = describe(err)
            continue
        row["scored"] = "kept model" if state == "finished" else f"checkpoint {step}"
        scorer = scorer or stage_scorer(c, c.local_root, runtime.device, data)
        model = model.to(runtime.device)
        if stage == "teacher":
            solver = c.teacher.sampler.model_copy(update={"sigma_max": c.rollout.solver.sigma_max})
            metrics, _ = scorer.teacher(model, solver)
            row.update({f"{k}_teacher": v for k, v in metrics.items()})
            continue
        sampler = method_of(c, stage).sampler
        one, _ = scorer.few_step(sampler, model, 1)
        two, _ = scorer.few_step(sampler, model, 2, mid)
        row.update({"mid_sigma": mid, **{f"{k}_1step": v for k, v in one.items()},
                    **{f"{k}_2step": v for k, v in two.items()}})
    return rows
