"""A training stage on DDP processes from inside a task: this node's ``torchrun`` agent of ``cmt stage``
(``cmt_core.runtime.torchrun_command`` with the config's ``launch`` section; with ``launch.nodes > 1`` the other
nodes run ``cmt launch <stage>`` with the same config and join at the rendezvous).

The subprocess writes the same artifact as the in-process runner (same config, same id). Its output goes
to the run log (tqdm bars left out), and progress is read from the training log it appends to
(``<artifact>/train/metrics.jsonl``), so the progress artifact moves as it would in process.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

from cmt_core.checkpoint import read_training_log
from cmt_core.config import save_yaml
from cmt_core.engine import Plan, StageResult, complete_result, reuse
from cmt_core.runtime import torchrun_command

_TQDM_BAR = re.compile(r"\d+%\|")
POLL_SECONDS = 2.0


def run_stage_ddp(plan: Plan, stage: str, logger, progress=None) -> StageResult:
    """Run the training ``stage`` under this node's torchrun agent (``cfg.launch``); return its artifact."""
    done = complete_result(plan, stage)
    if done is not None:
        return reuse(done)
    cfg, path = plan.cfg, plan.path(stage)
    total = getattr(cfg, stage).train.steps  # teacher / midtrain / posttrain: the stage's TrainConfig
    tail: deque[str] = deque(maxlen=40)
    with tempfile.TemporaryDirectory(prefix="cmt-ddp-") as tmp:
        config_file = Path(tmp) / "config.yaml"
        save_yaml(cfg, config_file)
        command = torchrun_command(cfg.launch, stage, config_file)
        logger.info("%s: %d node(s) x %d DDP processes: %s", stage, cfg.launch.nodes, cfg.launch.procs_per_node,
                    " ".join(command))
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})

        def forward_output() -> None:
            for line in proc.stdout:  # universal newlines: every tqdm refresh is a line of its own
                line = line.rstrip()
                if line and not _TQDM_BAR.search(line):
                    tail.append(line)
                    logger.info("[torchrun] %s", line)

        reader = threading.Thread(target=forward_output, daemon=True)
        reader.start()
        reported = -1
        while True:
            finished = proc.poll() is not None
            for row in read_training_log(path, after=reported):
                reported = row["step"]
                if progress is not None:
                    progress(row["step"], total, row)
            if finished:
                break
            time.sleep(POLL_SECONDS)
        reader.join(timeout=10)
    result = complete_result(plan, stage)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"torchrun {stage} exited with code {proc.returncode} and "
                           f"{'no' if result is None else 'a'} complete artifact at {path}; last output:\n"
                           + "\n".join(tail))
    return StageResult(stage, result.artifact_id, path, result.manifest, cached=False, location=result.location)
