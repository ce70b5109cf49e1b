"""Prefect tasks: one thin task per pipeline stage (see ``tasks.stages``).

A task resolves its stage's artifact id, returns at once when that artifact is complete on disk and
otherwise calls ``cmt_core``; Prefect caching keys on the artifact id (``tasks.caching``). Progress,
logs and result artifacts for the Prefect UI live in ``tasks.reporting``.
"""

import os

# Before prefect is imported anywhere below: the server's analytics service only adds sqlite lock noise.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Without PREFECT_API_URL a run starts a temporary server; creating its database on a new machine takes
# longer than Prefect's default wait on 2 busy cores.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from tasks.stages import STAGE_TASKS, run_stage_task  # noqa: E402

__all__ = ["STAGE_TASKS", "run_stage_task"]
