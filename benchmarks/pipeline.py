"""The main job, cold and cached: ``cmt-pipeline`` twice from an empty artifact root.

Writes ``benchmarks/results/pipeline.json``: ``preset``, ``cold_s`` (first run: every stage computed),
``cached_s`` (the same parameters again), ``cached_fraction`` = cached_s / cold_s and
``stages_recomputed_on_rerun`` (empty when every stage was reused), plus the stages the cold run computed
with their seconds, and ``disk_only_s``: a third run with an empty Prefect cache (as with a new server and
database on the same artifact root), where every stage is found complete on disk.

Without PREFECT_API_URL the flows run against a temporary Prefect server with its own database (started
before any timing); with it, against that server.

    .venv/bin/python benchmarks/pipeline.py                                  # the main job: digits
    .venv/bin/python benchmarks/pipeline.py --preset toy --set teacher.train.steps=200 --set midtrain.train.steps=200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "pipeline.json"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    parser.add_argument("--artifact-root", help="an empty (or absent) folder; default: a temporary one, removed after")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="cmt-bench-"))
    root = Path(args.artifact_root) if args.artifact_root else scratch / "artifacts"
    if root.exists() and any(root.iterdir()):
        parser.error(f"--artifact-root {root} is not empty")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if "PREFECT_API_URL" not in os.environ:
        os.environ["PREFECT_HOME"] = str(scratch / "prefect-home")  # a temporary server with a fresh database
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # busy shared machines

    import torch
    from prefect import flow

    from cmt_core.errors import config_message
    from cmt_core.presets import resolve_config
    from flows import cmt_pipeline
    from flows.parameters import trust_paths
    from tasks.caching import RESULTS_ENV

    # flow parameters must name allowed folders: these are the script's own choice, as cmt-flow's typed paths are
    try:
        trust_paths(resolve_config(args.preset, args.set, artifact_root=root))
    except ValueError as err:  # a bad --set: one line naming the field
        shutil.rmtree(scratch, ignore_errors=True)
        parser.error(config_message(err))

    @flow
    def warm_up() -> None:
        """Starts the temporary server outside the timings."""

    warm_up()

    def timed_run() -> tuple[float, dict]:
        t0 = time.perf_counter()
        results = cmt_pipeline(preset=args.preset, overrides=args.set, artifact_root=str(root))
        return time.perf_counter() - t0, results

    try:
        cold_s, cold = timed_run()
        cached_s, cached = timed_run()
        os.environ[RESULTS_ENV] = str(scratch / "empty-prefect-results")
        disk_only_s, disk_only = timed_run()
        del os.environ[RESULTS_ENV]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    result = {
        "preset": args.preset,
        "overrides": args.set,
        "cold_s": round(cold_s, 3),
        "cached_s": round(cached_s, 3),
        "cached_fraction": round(cached_s / cold_s, 5),
        "stages_recomputed_on_rerun": [s for s, r in cached.items() if not r.cached],
        "stages_computed_cold": [s for s, r in cold.items() if not r.cached],
        "stage_seconds_cold": {s: round(r.manifest.get("seconds", 0.0), 3) for s, r in cold.items()},
        "disk_only_s": round(disk_only_s, 3),
        "stages_recomputed_without_prefect_cache": [s for s, r in disk_only.items() if not r.cached],
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": metadata.version("torch"),
                    "prefect": metadata.version("prefect"),
                    "prefect_api": os.environ.get("PREFECT_API_URL", "temporary server")},
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
