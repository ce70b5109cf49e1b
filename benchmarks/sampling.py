"""Throughput of ``cmt sample`` against the bare network's forward rate, on the same batch, in one run.

For each generator (a digits flow map / consistency model of the digits preset's MLP, and a U-Net of the
``cifar10-tiny`` preset at 32 x 32, both with random weights: speed does not depend on training):

* ``forward``: images/s of the one network call of 1-step sampling (``model(x, sigma_max)``; a flow map's
  ``model(x, sigma_max, 0)``) on a batch of ``--batch`` rows already in
  memory (nothing else);
* ``draw``: images/s of ``Generator.draw`` at 1 step plus the uint8 conversion, over consecutive images: the
  per-image noise blocks, the padding to a multiple of 64 rows, the network call, the decode and the quantisation;
* ``file_writes``: files/s of this file system: a 200-byte file written under a temporary name and renamed, as each
  PNG is (the bound of ``run_sampling`` when the network is cheap);
* ``run_sampling``: images/s of the whole command at 1 step (``cmt_core.sampling.run_sampling``: noise, network,
  PNG files written by two threads, ``grid.png`` and ``sampling.json``) into a temporary folder.

The ratios ``draw / forward`` and ``run_sampling / forward`` are the figures (target: ``draw`` >= 0.9 of the bare
forward rate). Rates are medians of ``--repeats`` repeats. Writes ``benchmarks/results/sampling.json``.
Usage: ``python benchmarks/sampling.py [--batch 256] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cmt_core.data.images import to_uint8
from cmt_core.generator import Generator
from cmt_core.models import build_model
from cmt_core.presets import get_preset
from cmt_core.runtime import Runtime
from cmt_core.sampling import SampleJob, run_sampling
from cmt_core.stages import network_values

OUT = Path(__file__).parent / "results" / "sampling.json"
FILES = 1000  # small files written to measure the file system's rate


def generator(preset: str, shape: tuple[int, ...], kind: str) -> Generator:
    """A ``kind`` generator with the preset's network, random weights."""
    cfg = get_preset(preset)
    network = network_values(cfg.network.model_dump(mode="json"), 0)
    torch.manual_seed(0)
    model = build_model(kind, network, shape, cfg.rollout.solver.sigma_min)
    return Generator(model, kind, network, shape, cfg.rollout.solver.sigma_max, cfg.eval.mid_sigma)


def measure(gen: Generator, batch: int, batches: int) -> dict[str, float]:
    """Images/s of the three paths (module docstring), one repeat each. The network calls and ``draw`` alternate
    batch by batch, so both see the same state of the machine."""
    x = torch.randn(batch, *gen.sample_shape) * gen.sigma_max
    times = (gen.sigma_max, 0.0) if gen.kind == "flow_map" else (gen.sigma_max,)  # the 1-step sampler's call
    spent = {"forward": 0.0, "draw": 0.0}
    cache: dict = {}
    with torch.no_grad():
        gen.model(x, *times)  # warm-up
        for k in range(batches):
            t = time.perf_counter()
            gen.model(x, *times)
            spent["forward"] += time.perf_counter() - t
            t = time.perf_counter()
            images, _ = gen.draw(torch.arange(k * batch, (k + 1) * batch), 1, 0, None, cache)
            to_uint8(images)
            spent["draw"] += time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        for i in range(FILES):  # what the file system allows: a small file written and renamed, as a PNG is
            (Path(tmp) / f".{i}.tmp").write_bytes(bytes(200))
            (Path(tmp) / f".{i}.tmp").replace(Path(tmp) / f"{i}.bin")
        spent["file_writes"] = (time.perf_counter() - t) * batch * batches / FILES
    with tempfile.TemporaryDirectory() as tmp:
        job = SampleJob(model="in memory", out=Path(tmp), num_samples=batch * batches, steps=1, batch_size=batch)
        t = time.perf_counter()
        run_sampling(job, Runtime.detect("cpu"), (gen, None))
        spent["run_sampling"] = time.perf_counter() - t
    return {k: batch * batches / v for k, v in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cases = {"digits MLP, flow map (1, 8, 8)": (generator("digits", (1, 8, 8), "flow_map"), 40),
             "cifar10-tiny U-Net, consistency (3, 32, 32)": (generator("cifar10-tiny", (3, 32, 32), "consistency"),
                                                            4)}
    results = {}
    for name, (gen, batches) in cases.items():
        runs = [measure(gen, args.batch, batches) for _ in range(args.repeats)]
        rates = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        results[name] = {"images_per_s": rates, "draw_over_forward": rates["draw"] / rates["forward"],
                         "run_sampling_over_forward": rates["run_sampling"] / rates["forward"],
                         "images_per_repeat": args.batch * batches,
                         "parameters": sum(p.numel() for p in gen.model.parameters())}
        print(name, json.dumps(results[name], indent=1))
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"batch": args.batch, "repeats": args.repeats, "device": "cpu",
                               "threads": torch.get_num_threads(),
                               "machine": platform.processor() or platform.machine(),
                               "target": "draw >= 0.9 x forward", "results": results}, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
