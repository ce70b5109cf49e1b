"""Teacher rollouts on a dask cluster (or in this process without dask), written shard by shard into a store.

``run_rollouts(denoiser_factory, path, num, sample_shape, rollout_cfg, teacher_id)`` splits the ``num``
trajectories into the store's shards (``chunk_trajectories * shard_chunks`` trajectories; the last one
may be partial). Each shard is one dask task that builds the teacher with ``denoiser_factory`` inside
the worker, solves its trajectories ``rollout_cfg.batch_size`` at a time and writes the whole shard
itself, so no two writers ever share a shard (zarr 3 has no synchronizers).

* Determinism: trajectory k's noise is seeded by (seed, k) and a shard is always split into the same
  batches, so the store is bit-identical for any number of workers (on one device type). A duplicate
  writer (a task retried while its first attempt still runs) writes the same bytes with atomic renames (on
  object storage: whole-object puts). A store at a URL (``s3://...``) is written there by the workers directly.
* Resume: a rerun submits only the shards without a done marker; tasks are retried when they fail or their
  worker dies; ``complete`` is written last, with a record of every run (``rollout_runs``: shards computed,
  seconds, workers). A complete store returns at once.
* Cluster: a ``LocalCluster`` of ``cluster.workers`` processes for the run (closed after it), or the
  scheduler at ``cluster.address``. Without the ``dask`` extra installed (or with ``in_process=True``) the
  shards are solved one after another in this process, writing the same bytes. Each dask task uses one
  torch thread, so that one worker per core does not oversubscribe the machine; with ``cluster.gpu_resource``
  tasks ask for the dask resource ``GPU=1`` and run on CUDA (on a multi-GPU host, start one worker per GPU,
  each with its own ``CUDA_VISIBLE_DEVICES``, e.g. with dask-cuda, and pass the scheduler's address).
* Cost of writing: a task compresses and writes its shard after solving it, not overlapped with solving
  (about 30 ms of CPU per 4.4 MB shard with zstd here); a GPU sits idle for that time.

Conditional teachers (``num_classes`` > 0): each trajectory is solved for its class label
(``rollout.trajectory_cond``), stored beside its states in the same shard.

``denoiser_factory`` is a picklable zero-argument callable returning ``denoiser(x, t: (B,), cond)``,
e.g. a module-level function or a ``functools.partial`` of one; it should load weights from disk rather
than carry them, since it travels with every task. Each worker process builds the teacher once and
reuses it for its later shards.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cmt_core import conditioning
from cmt_core.cluster import dask_available, run_shards
from cmt_core.object_storage import location
from cmt_core.time_grids import make_grid
from cmt_core.trajectories.rollout import rollout_batch, trajectory_cond, trajectory_seeds
from cmt_core.trajectories.store import (
    create_store,
    mark_complete,
    missing_shards,
    open_store,
    store_exists,
    write_shard,
)

log = logging.getLogger("cmt")

_teacher_cache: dict = {}  # per worker process: {factory fingerprint: denoiser}


def _teacher(denoiser_factory, device: str):
    key = (hashlib.sha1(pickle.dumps(denoiser_factory)).hexdigest(), device)
    if key not in _teacher_cache:
        _teacher_cache.clear()
        denoiser = denoiser_factory()
        if isinstance(denoiser, torch.nn.Module):
            denoiser = denoiser.to(device).eval()
        _teacher_cache[key] = denoiser
    return _teacher_cache[key]


def rollout_shard(denoiser_factory, path, shard_index: int, rollout_cfg, threads: int | None = 1,
                  num_classes: int = 0) -> int:
    """Solve and write one whole shard (the body of a dask task); returns its number of trajectories.

    ``rollout_cfg``: a ``RolloutConfig``; ``threads``: torch threads of a dask worker (one per core-sized worker);
    None keeps the caller's; ``num_classes``: the trajectories' classes (0: unconditional)."""
    if threads is not None:
        torch.set_num_threads(threads)
    device = "cuda" if rollout_cfg.cluster.gpu_resource and torch.cuda.is_available() else "cpu"
    store = open_store(path, partial=True)
    start, stop = store.shard_range(shard_index)
    denoiser = _teacher(denoiser_factory, device)
    parts, conds = [], []
    for b in range(start, stop, rollout_cfg.batch_size):
        indices = range(b, min(b + rollout_cfg.batch_size, stop))
        conds.append(trajectory_cond(rollout_cfg.seed, indices, num_classes))
        parts.append(rollout_batch(denoiser, rollout_cfg.seed, indices, store.sample_shape, rollout_cfg.solver,
                                   device, conds[-1]))
    write_shard(store, shard_index, torch.cat(parts), conditioning.concat(conds))
    return stop - start


def _provenance(num: int, sample_shape, cfg, teacher_id: str, num_classes: int) -> dict:
    """Everything that decides the stored bits; a resumed store must match it exactly."""
    return {"teacher_id": teacher_id, "solver": cfg.solver.model_dump(mode="json"), "seed": cfg.seed,
            "num_classes": num_classes,
            "rollout_batch_size": cfg.batch_size, "num_trajectories": num, "sample_shape": list(sample_shape),
            "store": cfg.store.model_dump(mode="json")}


def _check_resumable(path, expected: dict) -> None:
    attrs = open_store(path, partial=True).attrs
    found = {k: attrs.get(k) for k in expected}
    diff = {k: (found[k], v) for k, v in expected.items() if found[k] != v}
    if diff:
        raise ValueError(f"{path} holds a different rollout; differing fields (stored, requested): {diff}. "
                         f"Use a new path (the artifact id should change with these settings).")


def _rollout_task(shard_index: int, denoiser_factory, path: str, rollout_cfg, num_classes: int) -> int:
    return rollout_shard(denoiser_factory, path, shard_index, rollout_cfg, num_classes=num_classes)


def run_rollouts(denoiser_factory, path, num: int, sample_shape, rollout_cfg, teacher_id: str,
                 progress: Callable[[int, int], None] | None = None, in_process: bool = False,
                 num_classes: int = 0) -> Path | str:
    """Fill the trajectory store at ``path`` (a folder, or a URL every worker can reach) with ``num`` teacher
    trajectories (``rollout_cfg``: a ``RolloutConfig``); resumes a partial store.

    ``progress(done, total)`` is called with the number of trajectories written after every shard (and once
    at the start); ``in_process`` solves the shards here instead of on dask (the default without dask);
    ``num_classes`` > 0: a class-conditional teacher, each trajectory solved for a random class (module docstring)."""
    path = location(path)
    sample_shape = tuple(int(s) for s in sample_shape)
    provenance = _provenance(num, sample_shape, rollout_cfg, teacher_id, num_classes)
    if store_exists(path):
        _check_resumable(path, provenance)
        if open_store(path, partial=True).complete:
            log.info("rollouts: %s is complete, nothing to do", path)
            return path
    else:
        create_store(path, num, sample_shape, make_grid(rollout_cfg.solver), rollout_cfg.store, provenance,
                     seeds=trajectory_seeds(rollout_cfg.seed, num),
                     cond_shapes={"class_labels": (num_classes,)} if num_classes else None)
    store = open_store(path, partial=True)
    todo = missing_shards(store)
    on_dask = not in_process and dask_available()
    t0 = time.perf_counter()
    if todo:
        done = len(store) - sum(store.shard_range(k)[1] - store.shard_range(k)[0] for k in todo)
        with tqdm(total=len(store), initial=done, desc="rollouts", unit="traj", dynamic_ncols=True) as bar:
            def advance(trajectories: int) -> None:
                bar.update(trajectories)
                if progress is not None:
                    progress(int(bar.n), len(store))

            advance(0)
            if on_dask:
                run_shards(rollout_cfg.cluster, _rollout_task, todo, "rollout", advance,
                           {"GPU": 1} if rollout_cfg.cluster.gpu_resource else None, denoiser_factory=denoiser_factory,
                           path=str(path), rollout_cfg=rollout_cfg, num_classes=num_classes)
            else:
                for k in todo:
                    advance(rollout_shard(denoiser_factory, path, k, rollout_cfg, threads=None,
                                          num_classes=num_classes))
    runs = list(store.attrs.get("rollout_runs", []))
    where = (rollout_cfg.cluster.address or f"LocalCluster({rollout_cfg.cluster.workers} workers)") if on_dask \
        else "in process"
    runs.append({"shards_computed": len(todo), "shards_total": store.num_shards, "seconds": time.perf_counter() - t0,
                 "cluster": where, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    mark_complete(path, rollout_runs=runs)
    log.info("rollouts: %s complete, %d of %d shards computed in this run", path, len(todo), store.num_shards)
    return path

