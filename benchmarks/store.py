"""Trajectory store benchmarks: rollout write cost, dask scaling, store-fed vs in-memory vs online training.

Writes ``benchmarks/results/store.json``. The teacher and the student are the same MLP
(``Denoiser`` / ``ConsistencyModel`` around ``MLP(64, WIDTH, DEPTH)``) on digits-sized vectors (64-dim),
so rollouts and training are network-dominated as at full scale. The teacher has random weights: the
timings do not depend on what it learned. Every timed arm runs several times, interleaved with the arm it
is compared to, and the fastest repeat counts (other processes share this machine's cores; the load
average is recorded with every section). In-process arms also record the CPU seconds of this process,
a measure of work that other processes' load does not inflate. Training arms use one torch thread in
this process; the store's prefetch thread may use the other core.

    .venv/bin/python benchmarks/store.py
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmt_core.config import ClusterConfig, RolloutConfig, SolverConfig, StoreConfig  # noqa: E402
from cmt_core.networks.mlp import MLP  # noqa: E402
from cmt_core.preconditioning import ConsistencyModel, Denoiser  # noqa: E402
from cmt_core.time_grids import make_grid  # noqa: E402
from cmt_core.trajectories.dask_rollouts import rollout_shard, run_rollouts  # noqa: E402
from cmt_core.trajectories.pairs import (  # noqa: E402
    StorePairs,  # noqa: E402
    TrajectoryPairs,
    pair_batch,
)
from cmt_core.trajectories.rollout import rollout_batch, trajectory_seeds  # noqa: E402
from cmt_core.trajectories.store import create_store, mark_complete, open_store, write_shard  # noqa: E402

DIM, WIDTH, DEPTH = 64, 256, 4
SHAPE = (DIM,)
SOLVER = SolverConfig(name="dpm2m", steps=16)  # the reference: 16 DPM-Solver++ steps, 80 -> 0.002
STORE = StoreConfig(chunk_trajectories=256, shard_chunks=4)
REPEATS = 3
WRITE_SHARDS = 12  # write_vs_bare: shards of 1024 trajectories per arm
SCALE_TRAJ = 24576  # workers2_vs_1: 24 shards
TRAIN_STEPS, WARMUP = 220, 20  # per training arm
SWEEP_STEPS, SWEEP_LRS, SWEEP_REPEATS = 150, (1e-4, 2e-4, 4e-4, 8e-4), 2
BATCH, ONLINE_TRAJ = 128, 8  # a batch of 128 pairs = 8 trajectories x 16 points
OUT = Path(__file__).resolve().parent / "results" / "store.json"


def teacher(seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(MLP(DIM, WIDTH, DEPTH)).eval()


def student(seed: int = 0) -> ConsistencyModel:
    """CMT initialises the student from the teacher's weights."""
    model = ConsistencyModel(MLP(DIM, WIDTH, DEPTH))
    model.raw.load_state_dict(teacher(seed).raw.state_dict())
    return model


def rollout_cfg(workers: int) -> RolloutConfig:
    return RolloutConfig(solver=SOLVER, batch_size=512, seed=0, store=STORE, cluster=ClusterConfig(workers=workers))


def best(times: list[float]) -> float:
    return min(times)


# ------------------------------------------------------------------------------------------ rollouts
def bench_write_vs_bare(tmp: Path) -> dict:
    """Rollouts in this process, one thread: the dask task body (solve + write a shard) vs solving only.

    The arms alternate shard by shard (the order rotating every round), so that drifts in the machine's
    speed hit them alike; store creation and the complete flag count in the write arms' time. The headline
    is the default store (zstd level 3); cheaper codecs trade bytes for write time.
    """
    factory = functools.partial(teacher, 0)
    stores = {"zstd3": STORE, "zstd1": STORE.model_copy(update={"level": 1}),
              "none": STORE.model_copy(update={"codec": "none"})}
    shard = STORE.chunk_trajectories * STORE.shard_chunks
    num = WRITE_SHARDS * shard
    torch.set_num_threads(1)
    denoiser = teacher(0)
    wall = {name: [] for name in ("bare", *stores)}
    cpu = {name: [] for name in wall}

    def timed(name, fn):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall[name].append(time.perf_counter() - t0)
        cpu[name].append(time.process_time() - c0)

    cfgs = {name: rollout_cfg(1).model_copy(update={"store": store}) for name, store in stores.items()}
    for name, store in stores.items():
        timed(name, lambda: create_store(tmp / f"write-{name}", num, SHAPE, make_grid(SOLVER), store, {"seed": 0},
                                                      seeds=trajectory_seeds(0, num)))
    arms = list(wall)
    for k in range(WRITE_SHARDS):
        for name in arms[k % len(arms):] + arms[:k % len(arms)]:
            if name == "bare":
                timed(name, lambda: [rollout_batch(denoiser, 0, range(b, b + 512), SHAPE, SOLVER)
                                     for b in range(k * shard, (k + 1) * shard, 512)])
            else:
                timed(name, lambda: rollout_shard(factory, tmp / f"write-{name}", k, cfgs[name]))
    for name in stores:
        timed(name, lambda: mark_complete(tmp / f"write-{name}"))
        shutil.rmtree(tmp / f"write-{name}")
    total = {k: sum(v) for k, v in wall.items()}
    total_cpu = {k: sum(v) for k, v in cpu.items()}
    return {"trajectories": num, "wall_s": total, "cpu_s": total_cpu,
            "traj_per_s": {k: num / v for k, v in total.items()},
            "ratio_by_codec": {k: total["bare"] / total[k] for k in stores},
            "cpu_ratio_by_codec": {k: total_cpu["bare"] / total_cpu[k] for k in stores},
            "ratio": total["bare"] / total["zstd3"], "load_average": os.getloadavg()}


def bench_workers(tmp: Path) -> dict:
    """``run_rollouts`` end to end (LocalCluster start and close included) with 1 and with 2 workers."""
    factory = functools.partial(teacher, 0)
    run_rollouts(factory, tmp / "warmup", 64, SHAPE, rollout_cfg(2), "bench-mlp")  # forkserver
    times = {1: [], 2: []}
    for rep in range(REPEATS):
        for workers in (1, 2):
            path = tmp / f"w{workers}-{rep}"
            t0 = time.perf_counter()
            run_rollouts(factory, path, SCALE_TRAJ, SHAPE, rollout_cfg(workers), "bench-mlp")
            times[workers].append(time.perf_counter() - t0)
            if rep or workers == 1:
                shutil.rmtree(path)
    return {"trajectories": SCALE_TRAJ, "workers1_s": times[1], "workers2_s": times[2],
            "workers1_traj_per_s": SCALE_TRAJ / best(times[1]), "workers2_traj_per_s": SCALE_TRAJ / best(times[2]),
            "ratio": best(times[1]) / best(times[2]), "store": str(tmp / "w2-0"), "load_average": os.getloadavg()}


# ------------------------------------------------------------------------------------------ training
def train(batch_fn, steps: int, lr: float = 2e-4, warmup: int = 0, cpu: list | None = None) -> float:
    """Mid-training steps (CM loss ||f(x_t, t) - x_s||^2, RAdam); seconds of the steps after ``warmup``.

    ``cpu`` receives the CPU seconds of this process over the same steps."""
    torch.set_num_threads(1)
    model = student()
    opt = torch.optim.RAdam(model.parameters(), lr=lr)
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(steps):
        if step == warmup:
            t0, c0 = time.perf_counter(), time.process_time()
        batch = batch_fn(step)
        loss = (model(batch["x_t"], batch["t"]) - batch["x_s"]).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if cpu is not None:
        cpu.append(time.process_time() - c0)
    return time.perf_counter() - t0


def online_batch_fn(seed: int = 0):
    """The reference recipe: solve 8 fresh teacher trajectories in every step and use their 8 x 16 points."""
    denoiser = teacher(0)

    def batch(step):
        states = rollout_batch(denoiser, seed, range(step * ONLINE_TRAJ, (step + 1) * ONLINE_TRAJ), SHAPE, SOLVER)
        last = states.shape[1] - 1
        traj = torch.arange(ONLINE_TRAJ).repeat_interleave(last)
        i = torch.arange(last).repeat(ONLINE_TRAJ)
        return pair_batch(states, make_grid(SOLVER), traj, i, torch.full_like(i, last))
    return batch


def bench_training(store_path: Path) -> dict:
    store = open_store(store_path)
    memory = TrajectoryPairs(store.read(range(len(store))), store.grid, to_end=True, seed=0)
    online = online_batch_fn()
    steps = TRAIN_STEPS - WARMUP
    times = {"memory": [], "store": [], "online": []}
    cpu = {k: [] for k in times}
    for _ in range(REPEATS):
        times["memory"].append(train(lambda s: memory.batch(s, BATCH), TRAIN_STEPS, warmup=WARMUP, cpu=cpu["memory"]))
        pairs = StorePairs(store_path, to_end=True, seed=0)
        times["store"].append(train(lambda s: pairs.batch(s, BATCH), TRAIN_STEPS, warmup=WARMUP, cpu=cpu["store"]))
        pairs.close()
        times["online"].append(train(online, TRAIN_STEPS, warmup=WARMUP, cpu=cpu["online"]))
    step_ms = {k: 1e3 * best(v) / steps for k, v in times.items()}
    cpu_step_ms = {k: 1e3 * best(v) / steps for k, v in cpu.items()}
    return {"steps_timed": steps, "batch": BATCH, "seconds": times, "step_ms": step_ms,
            "cpu_seconds": cpu, "cpu_step_ms": cpu_step_ms,
            "cpu_store_vs_memory": cpu_step_ms["store"] / cpu_step_ms["memory"],
            "cpu_store_vs_online": cpu_step_ms["online"] / cpu_step_ms["store"],
            "pairs_per_s": {k: BATCH * 1e3 / v for k, v in step_ms.items()},
            "store_vs_memory": step_ms["store"] / step_ms["memory"],
            "store_vs_online": step_ms["online"] / step_ms["store"], "load_average": os.getloadavg()}


def bench_sweep(tmp: Path) -> dict:
    """4 mid-training runs (learning rates) on one store, rollouts included once, vs 4 online runs."""
    num = SWEEP_STEPS * BATCH // (SOLVER.steps)  # one epoch per run: the same number of pairs as online
    store_s, online_s = [], []
    for rep in range(SWEEP_REPEATS):
        t0 = time.perf_counter()
        path = run_rollouts(functools.partial(teacher, 0), tmp / f"sweep{rep}", num, SHAPE, rollout_cfg(2),
                            "bench-mlp")
        rollout_s = time.perf_counter() - t0
        for lr in SWEEP_LRS:
            pairs = StorePairs(path, to_end=True, seed=0)
            train(lambda s: pairs.batch(s, BATCH), SWEEP_STEPS, lr=lr)
            pairs.close()
        store_s.append((time.perf_counter() - t0, rollout_s))
        t0 = time.perf_counter()
        for lr in SWEEP_LRS:
            train(online_batch_fn(), SWEEP_STEPS, lr=lr)
        online_s.append(time.perf_counter() - t0)
    store_total = best([s for s, _ in store_s])
    return {"runs": len(SWEEP_LRS), "steps_per_run": SWEEP_STEPS, "trajectories": num,
            "store_total_and_rollout_s": store_s, "online_total_s": online_s,
            "ratio": store_total / best(online_s), "load_average": os.getloadavg()}


# ------------------------------------------------------------------------------------------ sizes
def bench_bytes(store_path: Path, tmp: Path, num: int = 1024) -> dict:
    states = open_store(store_path).read(range(num))
    sizes = {"uncompressed/float32": 17 * DIM * 4, "uncompressed/16-bit": 17 * DIM * 2}
    for codec in ("zstd", "blosc", "none"):
        for dtype in ("float32", "float16", "bfloat16"):
            cfg = StoreConfig(codec=codec, dtype=dtype, chunk_trajectories=256, shard_chunks=4)
            path = tmp / f"bytes-{codec}-{dtype}"
            store = create_store(path, num, SHAPE, make_grid(SOLVER), cfg, {"seed": 0}, seeds=trajectory_seeds(0, num))
            for k in range(store.num_shards):
                write_shard(store, k, states[slice(*store.shard_range(k))])
            on_disk = sum(f.stat().st_size for f in (path / "states").rglob("*") if f.is_file())
            sizes[f"{codec}/{dtype}"] = on_disk / num
            shutil.rmtree(path)
    return sizes


def machine() -> dict:
    versions = {}
    for name in ("torch", "zarr", "numcodecs", "dask", "distributed", "numpy"):
        versions[name] = metadata.version(name)
    return {"cores": os.cpu_count(), "device": "cpu", "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(), "versions": versions, "load_average_start": os.getloadavg()}


def main() -> None:
    info = machine()
    tmp = Path(tempfile.mkdtemp(prefix="cmt-store-bench-"))
    t_start = time.perf_counter()
    try:
        write = bench_write_vs_bare(tmp)
        print("write_vs_bare", write, flush=True)
        workers = bench_workers(tmp)
        print("workers", workers, flush=True)
        store_path = Path(workers["store"])
        training = bench_training(store_path)
        print("training", training, flush=True)
        sweep = bench_sweep(tmp)
        print("sweep", sweep, flush=True)
        sizes = bench_bytes(store_path, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info["load_average_end"] = os.getloadavg()
    info["benchmark_seconds"] = time.perf_counter() - t_start
    result = {
        "write_vs_bare": write["ratio"],
        "workers2_vs_1": workers["ratio"],
        "store_vs_memory_step_time": training["store_vs_memory"],
        "store_vs_online_pairs_per_s": training["store_vs_online"],
        "sweep4_store_vs_online_wall": sweep["ratio"],
        "targets": {"write_vs_bare": ">= 0.90", "workers2_vs_1": ">= 1.6", "store_vs_memory_step_time": "<= 1.10",
                    "store_vs_online_pairs_per_s": ">= 1.2", "sweep4_store_vs_online_wall": "<= 0.85"},
        "bytes_per_trajectory": sizes,
        "details": {"teacher_student": f"MLP(dim={DIM}, width={WIDTH}, depth={DEPTH}), random teacher weights",
                    "solver": SOLVER.model_dump(mode="json"), "store": STORE.model_dump(mode="json"),
                    "write_vs_bare": write, "workers": workers, "training": training, "sweep": sweep},
        "machine": info,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))


if __name__ == "__main__":
    main()
