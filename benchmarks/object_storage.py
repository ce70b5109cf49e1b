"""Streaming loader throughput from object storage vs local disk: ``StorePairs`` over the same trajectory store
(bit-identical objects) on this machine's disk and on an S3-compatible server on loopback (moto, started here).

Writes ``benchmarks/results/object_storage.json``. For each store layout (a preset's chunking and dtype, random
states of that shape: the timing does not depend on what they hold), three figures, each S3 / local:

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

The local and S3 arms alternate and the fastest of ``--repeats`` counts (other processes share the cores). moto
is a Python server on the same two cores that copies a whole shard object to answer a range request, and
botocore spends a few ms of CPU per request: the figures are lower bounds for a real object store.

    .venv/bin/python benchmarks/object_storage.py            # about two minutes
    .venv/bin/python benchmarks/object_storage.py --quick    # tiny sizes (the test)
"""

from __future__ import annotations

import argparse
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
    "digits": ((64,), 8192, 17, StoreConfig(chunk_trajectories=128, shard_chunks=4), 256),
    "cifar10_chunks": ((3, 32, 32), 1024, 17, StoreConfig(dtype="float16", chunk_trajectories=64, shard_chunks=4), 128),
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
    model = build_model("consistency", cfg.network, shape, cfg.rollout.solver.sigma_min)
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


def measure(layouts: dict, epochs: int, repeats: int, train_steps: int) -> dict:
    results = {}
    with tempfile.TemporaryDirectory(prefix="cmt-bench-") as tmp, s3_server():
        bucket = make_bucket("bench")
        for name, (shape, num, states, layout, batch) in layouts.items():
            local = Path(tmp) / name / "store.zarr"
            url = f"{bucket}/{name}/store.zarr"
            build_store(local, shape, num, states, layout)
            upload(local, url)
            half = sum(p.stat().st_size for p in local.rglob("*") if p.is_file()) // 2
            arms = (("local", local, REMOTE_CACHE_BYTES), ("s3", url, REMOTE_CACHE_BYTES), ("s3_ranges", url, half))
            runs = {arm: [] for arm, _, _ in arms}
            for _ in range(repeats):
                for arm, where, cache in arms:
                    runs[arm].append(drain(where, batch, epochs, cache))
            cold = {arm: max(r[0] for r in rates) for arm, rates in runs.items()}
            warm = {arm: max(max(r[1:]) for r in rates) for arm, rates in runs.items() if arm != "s3_ranges"}
            figures = {"cold_pairs_per_s": cold, "warm_pairs_per_s": warm,
                       "ratio": {"cold": cold["s3"] / cold["local"], "cold_ranges": cold["s3_ranges"] / cold["local"],
                                 "warm": warm["s3"] / warm["local"]}}
            if len(shape) == 1 and train_steps:
                steps = {"local": [], "s3": []}
                for _ in range(repeats):
                    for arm, where in (("local", local), ("s3", url)):
                        steps[arm].append(train_rate(where, shape, batch, train_steps))
                figures["training_steps_per_s"] = {arm: max(v) for arm, v in steps.items()}
                figures["ratio"]["training"] = max(steps["s3"]) / max(steps["local"])
            size = sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
            results[name] = {
                "sample_shape": list(shape), "trajectories": num, "states": states, "batch_size": batch,
                "store": layout.model_dump(mode="json"), "store_bytes": size, "epochs": epochs, **figures,
                "repeats": runs}
            print(f"{name}: S3 / local pairs/s: " + ", ".join(f"{k} {v:.2f}" for k, v in figures["ratio"].items()),
                  flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (what the test runs)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per loader (the first is cold)")
    parser.add_argument("--train-steps", type=int, default=300, help="steps of the training arm (0: none)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    layouts = measure(QUICK if args.quick else LAYOUTS, args.epochs, args.repeats,
                      20 if args.quick else args.train_steps)
    out = {"benchmark": "object_storage", "target_ratio": TARGET, "server": "moto (python -m moto.server) on 127.0.0.1",
           "layouts": layouts, "seconds": time.perf_counter() - t0, "cpu_count": os.cpu_count(),
           "load_average": os.getloadavg(), "python": platform.python_version(),
           "versions": package_versions(("torch", "zarr", "fsspec", "s3fs", "moto", "numcodecs")),
           "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
