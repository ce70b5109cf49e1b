"""What a run shows in the Prefect UI: logs, a progress artifact per computing stage, result artifacts.

* ``StageProgress`` is the ``progress(done, total, row)`` callback of a stage (training steps, rollout
  trajectories): it creates a progress artifact when the stage starts computing, moves it, and writes
  run-log lines (one per training-log row).
* ``library_logs_to`` forwards the ``cmt`` library logger into the Prefect run logger while a stage runs.
* ``publish_*`` write the result artifacts of a flow run from what the stages left on disk: a summary table
  of every stage, a loss-curve report for each training stage computed in the run, and the evaluation's
  metrics table and report (``report.md`` with its PNGs embedded as data URLs so they render in the UI).
  They read the artifact folders only, so a run that reuses everything still shows the results.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
import time
from pathlib import Path

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from cmt_core.checkpoint import read_training_log
from cmt_core.engine import StageResult

_IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")


class StageProgress:
    """Progress artifact of one stage, created at its first report (a reused stage reports nothing) and
    updated at most every ``min_interval`` seconds."""

    def __init__(self, stage: str, artifact_id: str, logger, min_interval: float = 2.0):
        self.stage, self.artifact_id, self.logger, self.min_interval = stage, artifact_id, logger, min_interval
        self.artifact, self.last_update, self.last_logged = None, 0.0, 0.0

    def _create(self) -> None:
        if self.artifact is None:
            self.artifact = create_progress_artifact(0.0, description=f"{self.stage} {self.artifact_id}")

    def __call__(self, done: int, total: int, row: dict) -> None:
        self._create()
        now = time.monotonic()
        if row or done >= total or now - self.last_logged >= 10 * self.min_interval:
            self.last_logged = now
            values = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in row.items() if k != "step")
            self.logger.info("%s: %d/%d %s", self.stage, done, total, values)
        if done >= total or now - self.last_update >= self.min_interval:
            self.last_update = now
            update_progress_artifact(self.artifact, 100.0 * min(done, total) / max(total, 1))

    def done(self) -> None:
        """The stage computed its artifact (a stage without progress reports gets a finished artifact)."""
        self._create()
        update_progress_artifact(self.artifact, 100.0)


class _ToRunLogger(logging.Handler):
    def __init__(self, run_logger):
        super().__init__()
        self.run_logger = run_logger

    def emit(self, record: logging.LogRecord) -> None:
        self.run_logger.log(record.levelno, record.getMessage())


@contextlib.contextmanager
def library_logs_to(run_logger, name: str = "cmt"):
    """Send INFO and above of the library logger ``name`` to ``run_logger`` inside the block."""
    library = logging.getLogger(name)
    handler, level, propagate = _ToRunLogger(run_logger), library.level, library.propagate
    library.addHandler(handler)
    library.setLevel(logging.INFO)
    library.propagate = False  # the run logger prints to the console already
    try:
        yield
    finally:
        library.removeHandler(handler)
        library.setLevel(level)
        library.propagate = propagate


def artifact_key(*parts: str) -> str:
    """An artifact key (lowercase letters, digits and dashes) from free-form parts."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


def embed_images(markdown: str, folder: Path) -> str:
    """Replace links to PNG files of ``folder`` by ``data:image/png;base64,...`` URLs."""
    from cmt_core.evaluation.report import png_data_url  # matplotlib, clean-fid: imported when used

    def embed(match: re.Match) -> str:
        path = folder / match.group(2)
        return f"![{match.group(1)}]({png_data_url(path)})" if path.is_file() else match.group(0)

    return _IMAGE_LINK.sub(embed, markdown)


def brief(metrics: dict) -> str:
    """Scalar metrics as ``k=v`` pairs (nested tables left out)."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in metrics.items() if not isinstance(v, (dict, list)))


def publish_stage_summary(results: dict[str, StageResult], preset: str) -> None:
    """One table row per stage of the run: computed or reused, artifact id, seconds, metrics, folder."""
    rows = [{"stage": r.stage, "status": "reused" if r.cached else "computed", "artifact_id": r.artifact_id,
             "seconds": round(float(r.manifest.get("seconds") or 0.0), 2), "metrics": brief(r.metrics),
             "path": str(r.path)} for r in results.values()]
    computed = [r.stage for r in results.values() if not r.cached]
    create_table_artifact(rows, key=artifact_key("cmt", preset, "stages"),
                          description=f"Stages of this run ({preset}); computed: {', '.join(computed) or 'none'}")


def publish_training_report(result: StageResult) -> None:
    """Loss (and evaluation) curves and final metrics of a training stage, as a markdown artifact."""
    from cmt_core.evaluation.report import markdown_table, png_data_url, save_curve_figure

    rows = read_training_log(result.path)
    lines = [f"# {result.stage}: artifact `{result.artifact_id}`", "",
             markdown_table([{"metric": k, "value": v} for k, v in result.metrics.items()]), ""]
    if rows:
        with tempfile.TemporaryDirectory() as tmp:
            figure = Path(tmp) / "curve.png"
            save_curve_figure(figure, rows, result.stage)
            lines.append(f"![{result.stage} training curves]({png_data_url(figure)})")
    lines += ["", f"Folder: `{result.path}`"]
    create_markdown_artifact("\n".join(lines), description=f"{result.stage} training report")


def publish_evaluation(result: StageResult, preset: str) -> None:
    """The evaluation's results table and its report (sample grids and loss curves embedded)."""
    report_file = result.path / "report.md"
    rows = result.metrics.get("rows", [])
    if rows:
        columns = list(dict.fromkeys(k for row in rows for k in row))  # the UI takes columns from row 0
        rows = [{c: row.get(c) for c in columns} for row in rows]
        create_table_artifact(rows, key=artifact_key("cmt", preset, "metrics"),
                              description=f"Evaluation metrics ({preset}, artifact {result.artifact_id})")
    if report_file.exists():
        create_markdown_artifact(embed_images(report_file.read_text(), result.path),
                                 key=artifact_key("cmt", preset, "report"),
                                 description=f"Evaluation report ({preset}, artifact {result.artifact_id})")
