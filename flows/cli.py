"""``cmt-flow``: run the ``cmt-pipeline`` flow from a terminal (the README's main job).

    cmt-flow --preset digits [--set key=value ...] [--artifact-root DIR] [--ddp-processes N]

Without ``PREFECT_API_URL`` Prefect starts a temporary local server for the run; with it, the run is
recorded on that server and shows in its UI. Prints every stage (computed or cached), the metrics table
and the path of the report.
"""

from __future__ import annotations

import argparse
import sys

import tasks  # noqa: F401  (Prefect environment defaults before prefect is imported)

from cmt_core.cli import add_config_args, config_from_args, print_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cmt-flow", description="run the cmt-pipeline Prefect flow")
    add_config_args(parser)
    parser.add_argument("--ddp-processes", type=int, default=1, help="mid-training processes (torchrun when > 1)")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        print(f"invalid configuration:\n{err}", file=sys.stderr)
        return 2
    from flows.pipeline import cmt_pipeline

    results = cmt_pipeline(preset=cfg.preset if cfg.preset != "custom" else "digits", config=cfg,
                           ddp_processes=args.ddp_processes)
    print_results(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
