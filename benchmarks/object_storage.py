"""Streaming loader throughput from object storage vs local disk: ``StorePairs`` over the same trajectory store
(bit-identical objects) on this machine's disk and on an S3-compatible server on loopback (moto, started here).

Writes ``benchmarks/results/object_storage.json``. For each store layout (a preset's chunking and dtype, random
states of that shape: the timing does not depend on what they hold), figures S3 / local:

* ``cold``: the first epoch of a fresh loader, drained as fast as it goes (no training in between: the strictest
  comparison). Every S3 byte is fetched over the network; the local store is in the page cache (it was just
  written), as it is on a training machine after its first epoch. These stores fit the loader's memory cache, so
  each shard is one request (``WholeObjectStore``);
* ``cold_ranges``: the same with a cache of half the store, so that it is read by byte ranges (a request per
  chunk, one per shard index: ``CacheStore``), as a store larger than memory is (CIFAR-10's, at the paper's size);
* ``warm``: the later epochs of that loader: the S3 store is served by the loader's memory cache
  (``open_store``'s ``cache_bytes``), the local one by the page cache;
* ``training``: steps/s of the digits preset's mid-training step (its MLP, the CM loss, Adam, one torch thread)
  fed by the loader from step 0 (first epoch, cold), which is what a run sees.

Two placements, each with its own server: ``split_cores`` (the reported one), the server pinned to the last CPU
and every thread of this process (both arms, the loader's readers, the S3 client's event loop) to the others, as
when the object store is another machine and the loader has the same CPUs in both arms; and ``shared_cores``,
nothing pinned, where the server's own CPU (moto is Python: a few ms per request, and it copies a whole object to
answer a range) is taken from the loader under test. ``request_ms`` is the S3 client's CPU per GET of one chunk
(botocore's signing, parsing and hooks), the cost that small chunks read by ranges pay per chunk.

The local and S3 arms alternate and the fastest of ``--repeats`` counts (other processes share the cores).

    .venv/bin/python benchmarks/object_storage.py            # about seven minutes
    .venv/bin/python benchmarks/object_storage.py --quick    # tiny sizes (the test)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmt_core.artifacts import package_versions  # noqa: E402
from cmt_core.config import StoreConfig  # noqa: E402
from cmt_core.models import build_model  # noqa: E402
from cmt_core.object_storage import filesystem  # noqa: E402
from cmt_core.objectives.cmt import CMTLoss  # noqa: E402
from cmt_core.objectives.distances import make_distance  # noqa: E402
from cmt_core.presets import get_preset  # noqa: E402
from cmt_core.trajectories.pairs import StorePairs  # noqa: E402
from cmt_core.trajectories.store import REMOTE_CACHE_BYTES, create_store, mark_complete, write_shard  # noqa: E402
from tests.servers import make_bucket, s3_server  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "object_storage.json"
# name -> (sample shape, trajectories, states, store layout, batch size): the digits preset's store, and CIFAR-10's
# chunks (64 trajectories x 17 states x 3x32x32 in float16, 6.7 MB) in shards of 4 chunks
LAYOUTS = {
    "digits": ((64,), 32768, 17, StoreConfig(chunk_trajectories=128, shard_chunks=4), 256),
    "cifar10_chunks": ((3, 32, 32), 4096, 17, StoreConfig(dtype="float16", chunk_trajectories=64, shard_chunks=4), 128),
}
QUICK = {"digits": ((64,), 512, 5, StoreConfig(chunk_trajectories=32, shard_chunks=2), 64)}
TARGET = 0.75  # S3 at least 75% of local disk


def build_store(path, shape, num: int, states: int, layout: StoreConfig) -> None:
    grid = torch.linspace(80.0, 0.0, states, dtype=torch.float64)
    store = create_store(path, num, shape, grid, layout)
    g = torch.Generator().manual_seed(0)
    for shard in range(store.num_shards):
        start, stop = store.shard_range(shard)
        write_shard(store, shard, torch.randn(stop - start, states, *shape, generator=g))
    mark_complete(path)


def upload(local: Path, url: str) -> None:
    fs, root = filesystem(url)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.put_file(str(path), f"{root}/{path.relative_to(local).as_posix()}")


def drain(location, batch: int, epochs: int, cache_bytes: int = REMOTE_CACHE_BYTES) -> list[float]:
    """Pairs per second of each of ``epochs`` epochs of a fresh loader reading from step 0."""
    pairs = StorePairs(location, to_end=False, seed=0, cache_bytes=cache_bytes)
    steps, rates = len(pairs) // batch, []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        for step in range(epoch * steps, (epoch + 1) * steps):
            pairs.batch(step, batch)
        rates.append(steps * batch / (time.perf_counter() - t0))
    pairs.close()
    return rates


def train_rate(location, shape, batch: int, steps: int) -> float:
    """Steps per second of the digits preset's mid-training step fed by a fresh loader (one torch thread)."""
    cfg = get_preset("digits")
    torch.manual_seed(0)
    model = build_model("consistency", cfg.network.model_dump(), shape, cfg.rollout.solver.sigma_min)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss = CMTLoss("cm", make_distance("squared_l2"))
    pairs = StorePairs(location, to_end=True, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        for step in range(steps):
            optimizer.zero_grad()
            loss(model, pairs.batch(step, batch), None).mean().backward()
            optimizer.step()
        return steps / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
        pairs.close()


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of process ``pid`` (threads started later inherit it from their starter)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # a thread that ended since the listing
            os.sched_setaffinity(int(task.name), cpus)


def request_ms(url: str, chunk_bytes: int, requests: int = 100) -> float:
    """The S3 client's CPU (ms) per ranged GET of ``chunk_bytes`` of the first shard of ``url``'s states."""
    fs, root = filesystem(url)
    key = sorted(fs.find(f"{root}/states/c"))[0]
    c0 = time.process_time()
    for _ in range(requests):
        fs.cat_file(key, start=0, end=chunk_bytes)
    return (time.process_time() - c0) / requests * 1e3


def measure_layout(spec, local: Path, url: str, epochs: int, repeats: int, train_steps: int) -> dict:
    """Every figure of one layout ``spec`` (shape, trajectories, states, store config, batch) for the local store
    and its copy at ``url``."""
    shape, num, states, layout, batch = spec
    size = sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
    arms = (("local", local, REMOTE_CACHE_BYTES), ("s3", url, REMOTE_CACHE_BYTES), ("s3_ranges", url, size // 2))
    runs = {arm: [] for arm, _, _ in arms}
    for _ in range(repeats):
        for arm, where, cache in arms:
            runs[arm].append(drain(where, batch, epochs, cache))
    cold = {arm: max(r[0] for r in rates) for arm, rates in runs.items()}
    warm = {arm: max(max(r[1:]) for r in rates) for arm, rates in runs.items() if arm != "s3_ranges"}
    ratio = {"cold": cold["s3"] / cold["local"], "cold_ranges": cold["s3_ranges"] / cold["local"],
             "warm": warm["s3"] / warm["local"]}
    chunk = size // -(-num // layout.chunk_trajectories)  # mean stored chunk
    figures = {"sample_shape": list(shape), "trajectories": num, "states": states, "batch_size": batch,
               "store": layout.model_dump(mode="json"), "store_bytes": size, "epochs": epochs,
               "cold_pairs_per_s": cold, "warm_pairs_per_s": warm, "ratio": ratio,
               "chunk_bytes": chunk, "request_ms": request_ms(url, chunk)}
    if len(shape) == 1 and train_steps:
        steps = {"local": [], "s3": []}
        for _ in range(repeats):
            for arm, where in (("local", local), ("s3", url)):
                steps[arm].append(train_rate(where, shape, batch, train_steps))
        figures["training_steps_per_s"] = {arm: max(v) for arm, v in steps.items()}
        ratio["training"] = max(steps["s3"]) / max(steps["local"])
    return {**figures, "repeats": runs}


def measure_placement(stores: dict, layouts: dict, split: bool, epochs: int, repeats: int, train_steps: int) -> dict:
    """Figures of every layout with the server pinned apart (``split``) or not; ``stores``: name -> local store."""
    cpus = sorted(os.sched_getaffinity(0)) if split else []
    server_cpus, client_cpus = ({cpus[-1]}, set(cpus[:-1])) if split else (None, None)
    results = {}
    with s3_server(cpus=server_cpus):
        bucket = make_bucket("bench")
        if split:
            pin(os.getpid(), client_cpus)
        try:
            for name, spec in layouts.items():
                url = f"{bucket}/{name}/store.zarr"
                upload(stores[name], url)
                results[name] = figures = measure_layout(spec, stores[name], url, epochs, repeats, train_steps)
                print(f"{'split' if split else 'shared'} cores, {name}: S3 / local: "
                      + ", ".join(f"{k} {v:.2f}" for k, v in figures["ratio"].items())
                      + f"; {figures['request_ms']:.1f} ms of client CPU per GET", flush=True)
        finally:
            if split:
                pin(os.getpid(), set(cpus))
    placement = {"server_cpus": sorted(server_cpus), "client_cpus": sorted(client_cpus)} if split else {}
    return {"server_cpus": None, "client_cpus": None, **placement, "layouts": results}


def measure(layouts: dict, epochs: int, repeats: int, train_steps: int) -> dict:
    """``{"split_cores": ..., "shared_cores": ...}`` (``split_cores`` is None on a single CPU, or where processes
    cannot be pinned)."""
    with tempfile.TemporaryDirectory(prefix="cmt-bench-") as tmp:
        stores = {}
        for name, (shape, num, states, layout, _) in layouts.items():
            stores[name] = Path(tmp) / name / "store.zarr"
            build_store(stores[name], shape, num, states, layout)
        split = hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1
        return {"split_cores": measure_placement(stores, layouts, True, epochs, repeats, train_steps) if split
                else None,
                "shared_cores": measure_placement(stores, layouts, False, epochs, repeats, train_steps)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (what the test runs)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per loader (the first is cold)")
    parser.add_argument("--train-steps", type=int, default=300, help="steps of the training arm (0: none)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    for flag, value, least in (("--epochs", args.epochs, 2), ("--repeats", args.repeats, 1),
                               ("--train-steps", args.train_steps, 0)):
        if value < least:  # --epochs: the first epoch is cold, the warm figure needs a second
            parser.error(f"{flag} must be at least {least}, got {value}")
    t0 = time.perf_counter()
    placements = measure(QUICK if args.quick else LAYOUTS, args.epochs, args.repeats,
                         20 if args.quick else args.train_steps)
    out = {"benchmark": "object_storage", "target_ratio": TARGET,
           "reported": "split_cores" if placements["split_cores"] else "shared_cores",
           "server": "moto's S3 application served by waitress on 127.0.0.1 (tests/servers.py)",
           **placements, "seconds": time.perf_counter() - t0, "cpu_count": os.cpu_count(),
           "load_average": os.getloadavg(), "python": platform.python_version(),
           "versions": package_versions(("torch", "zarr", "fsspec", "s3fs", "moto", "waitress", "numcodecs")),
           "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
