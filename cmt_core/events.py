"""A training run's TensorBoard event log: the scalars of every log row and the sample grids of every evaluation.

``EventLog(folder, enabled, images)`` writes TensorBoard event files (``events.out.tfevents.*``) into ``folder``
through ``torch.utils.tensorboard.SummaryWriter``, on the main process only (``enabled``: ``runtime.is_main``).
``cmt_core.training.train`` opens it at the first step the call may log, writes each row of ``metrics.jsonl`` to
it (``write``) and closes it when the call ends or fails. Every training stage (teacher and guide pre-training,
mid-training, post-training) logs into ``<its artifact folder>/tensorboard`` (``cmt_core.artifacts.EVENTS_DIR``),
beside ``train/``.

Tags, at the row's step (``step``: optimisation steps done; 0 is the evaluation before the first step):

* ``train/loss``, ``train/lr``, ``train/grad_norm``: the loss averaged over the steps since the last row, the
  learning rate and the gradient norm before clipping;
* ``eval/<metric>`` at evaluations: every ``eval_<metric>`` key of the row, e.g. ``eval/score_1step``,
  ``eval/score_2step``, ``eval/FD-digits_1step``, ``eval/flow_map_error_1step`` and the chosen 2-step sigma
  ``eval/mid_sigma``;
* ``time/seconds``, ``time/eval_seconds``: the wall time of this call of ``train`` and the part of it spent
  evaluating;
* ``samples/<name>`` at evaluations, image runs only: ``images[name]``, the grid cells the evaluation left there
  (``(N, C, H, W)`` in [0, 1]), tiled 8 to a row; ``cmt_core.stages`` draws ``samples/1step`` and ``samples/2step``:
  the first 64 samples of each, decoded to the sample space.

Resume: the writer starts with ``purge_step`` = the first step this call may log (the step after the checkpoint
the run resumes from; 0 for a fresh start), so TensorBoard drops the events of earlier files at or after it
(written after that checkpoint), as ``metrics.jsonl`` drops its rows: no step is shown twice. The log only reads
the rows and images it is given: it draws no random number and touches no model.

Without the ``tensorboard`` package (the optional ``[tensorboard]`` extra) it writes nothing and says so in one
INFO line. To watch: ``tensorboard --logdir <artifact_root>`` lists every run as
``<stage>/<artifact id>/tensorboard``. The event files are a view of the run, as its logs are: the manifest does not
record them (``cmt_core.artifacts.file_records``), so deleting them leaves the artifact complete, and under an
object-storage root they stay in the local mirror (``tensorboard --logdir <cache_root>``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

logger = logging.getLogger("cmt")
TIME_KEYS = ("seconds", "eval_seconds")


def tag(key: str) -> str:
    """The TensorBoard tag of a log row's key: ``seconds`` / ``eval_seconds`` -> ``time/<key>``, ``eval_<metric>``
    -> ``eval/<metric>``, any other -> ``train/<key>``."""
    if key in TIME_KEYS:
        return f"time/{key}"
    if key.startswith("eval_"):
        return f"eval/{key.removeprefix('eval_')}"
    return f"train/{key}"


def is_evaluation(row: dict) -> bool:
    """Whether a log row holds an evaluation (an ``eval_`` key besides ``eval_seconds``)."""
    return any(k.startswith("eval_") and k not in TIME_KEYS for k in row)


class EventLog:
    """The TensorBoard event files of one training run in ``folder`` (see the module docstring); a no-op unless
    ``enabled`` and ``tensorboard`` is installed. ``images``: a mapping the evaluation fills with its sample grids
    by name, read at each evaluation row."""

    def __init__(self, folder: Path, enabled: bool = True, images: Mapping[str, torch.Tensor] | None = None):
        self.folder, self.enabled, self.images = Path(folder), enabled, images if images is not None else {}
        self._writer = None

    def open(self, first_step: int) -> None:
        """Start writing; ``first_step``: the first step this call may log (the step after the checkpoint the run
        resumes from, 0 for a fresh start): the events of earlier files at or after it are dropped."""
        if not self.enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter  # the [tensorboard] extra
        except ImportError:
            logger.info("tensorboard is not installed: no event files in %s (pip install 'cmt[tensorboard]')",
                        self.folder)
            return
        self._writer = SummaryWriter(str(self.folder), purge_step=first_step)

    def write(self, row: dict) -> None:
        """A ``metrics.jsonl`` row (``step`` and numbers): each number as a scalar, and the ``images`` after an
        evaluation; flushed, so a running TensorBoard shows it at once."""
        if self._writer is None:
            return
        step = row["step"]
        for key, value in row.items():
            if key != "step":
                self._writer.add_scalar(tag(key), value, step)
        if is_evaluation(row):
            for name, grid in self.images.items():
                self._writer.add_images(f"samples/{name}", grid, step)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file (a no-op when nothing was opened)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
