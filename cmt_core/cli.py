"""The ``cmt`` command line.

    cmt run --preset digits [--set midtrain.train.lr=1e-4 ...] [--config cfg.yaml] [--artifact-root DIR]
    cmt stage midtrain --config cfg.yaml        # one stage (e.g. under torchrun for DDP)
    cmt config --preset toy > toy.yaml          # print a preset as YAML to edit
    cmt store verify PATH                       # check a trajectory store's completeness and checksums
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import yaml

from cmt_core.config import load_yaml
from cmt_core.presets import PRESETS, apply_overrides, get_preset


def config_from_args(args):
    if args.config:
        cfg = load_yaml(args.config)
        if args.set:
            cfg = type(cfg).model_validate(apply_overrides(cfg.model_dump(mode="json"), args.set))
    else:
        cfg = get_preset(args.preset, args.set)
    if args.artifact_root:
        cfg.artifact_root = args.artifact_root
    return cfg


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="digits", choices=sorted(PRESETS))
    p.add_argument("--config", help="YAML pipeline config (instead of --preset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    p.add_argument("--artifact-root", help="where artifacts live (default: the config's artifact_root)")


def print_stage(result) -> None:
    state = "cached" if result.cached else f"computed in {result.manifest.get('seconds', 0):.1f}s"
    print(f"[{result.stage}] {state}  {result.path}")
    metrics = result.metrics
    if result.stage == "evaluation" and "rows" in metrics:
        for row in metrics["rows"]:
            values = "  ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float))
            print(f"    {row['model']:<40} NFE={row['NFE']:<3} {values}")
    elif metrics:
        print("    " + json.dumps(metrics, default=str))


def print_results(results: dict) -> None:
    """Every stage (computed or cached, metrics) and the path of the report."""
    for result in results.values():
        print_stage(result)
    print(f"report: {results['evaluation'].path / 'report.md'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cmt", description="Consistency mid-training pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    add_config_args(sub.add_parser("run", help="run the whole pipeline"))
    add_config_args(stage := sub.add_parser("stage", help="run one stage"))
    stage.add_argument("name", choices=["teacher", "rollouts", "midtrain", "posttrain", "evaluation"])
    add_config_args(sub.add_parser("config", help="print the resolved config as YAML"))
    store = sub.add_parser("store", help="trajectory store tools")
    store.add_argument("action", choices=["verify"])
    store.add_argument("path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    if args.command == "store":
        from cmt_core.trajectory_store import main_verify

        return main_verify([args.path])
    try:
        cfg = config_from_args(args)
    except ValueError as err:  # pydantic's ValidationError is a ValueError: name the bad fields
        print(f"invalid configuration:\n{err}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        return 0

    from cmt_core import pipeline
    from cmt_core.runtime import Runtime

    runtime = Runtime.detect(cfg.device, cfg.precision, cfg.cpu_threads)
    if args.command == "stage":
        result = pipeline.STAGE_RUNNERS[args.name](cfg, runtime)
        if runtime.is_main:
            print_stage(result)
        return 0
    results = pipeline.run_pipeline(cfg, runtime)
    if runtime.is_main:
        print_results(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
