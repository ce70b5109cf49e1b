"""``cmt-flow``: the ``cmt-pipeline`` Prefect flow from the command line (``make run``).

Same options as ``cmt run`` (``cmt_core.cli``); prints every stage (computed or cached), the metrics table
and the path of the report. Without ``PREFECT_API_URL`` Prefect starts a temporary server for the run.
"""

from __future__ import annotations

import sys

import tasks  # noqa: F401  (Prefect environment defaults before prefect is imported)
from cmt_core.cli import config_from_args, config_parser, console_logging, print_results, setup_logging
from cmt_core.errors import config_error, failure_exit
from cmt_core.preflight import preflight
from cmt_core.stages import PIPELINE, plan
from flows.parameters import trust_paths


def main(argv: list[str] | None = None) -> int:
    parser = config_parser("cmt-flow", "run the cmt-pipeline Prefect flow")
    parser.add_argument("--ddp-processes", type=int, default=1, help="processes per training stage (torchrun when > 1)")
    args = parser.parse_args(argv)
    console_logging()
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        return config_error(err)
    log_file = None  # every path is handled below, where a failure is one line and an exit code
    try:
        resolved = plan(cfg)
        preflight(resolved, resolved.needed(PIPELINE))  # nothing is written for bad input, not even a log file
        log_file = setup_logging(cfg.local_root, "flow")
        trust_paths(cfg)  # typed in the user's own shell: the flow may use them (flows.parameters.confine)
        from flows.pipeline import cmt_pipeline

        results = cmt_pipeline(preset=cfg.preset if cfg.preset != "custom" else "digits", config=cfg,
                               ddp_processes=args.ddp_processes)
    except Exception as err:  # a stage failed (StageError: stage, folder, cause, next step) or read a bad file
        return failure_exit(err, log_file, args.debug)
    print_results(results)
    print(f"log: {log_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
