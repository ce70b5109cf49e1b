"""Mid-training on N DDP processes from inside a task: a ``torchrun`` subprocess of the ``cmt stage`` CLI.

The subprocess writes the same artifact as the in-process runner (same config, same id). Its output goes
to the run log (tqdm bars left out), and progress is read from the training log it appends to
(``<artifact>/train/metrics.jsonl``), so the progress artifact moves as it would in process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

from cmt_core.artifacts import read_manifest
from cmt_core.config import PipelineConfig, save_yaml
from cmt_core.pipeline import StageResult, stage_ids, stage_path

_TQDM_BAR = re.compile(r"\d+%\|")
POLL_SECONDS = 2.0


def torchrun_command(config_file: Path, processes: int, stage: str = "midtrain") -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "-m", "cmt_core.cli", "stage", stage, "--config", str(config_file)]


def _new_rows(log: Path, after: int) -> list[dict]:
    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if row.get("step", -1) > after:
            rows.append(row)
    return rows


def run_midtrain_ddp(cfg: PipelineConfig, processes: int, logger, progress=None) -> StageResult:
    """Run the mid-training stage under ``torchrun --nproc-per-node processes``; return its artifact."""
    path, total = stage_path(cfg, "midtrain"), cfg.midtrain.train.steps
    tail: deque[str] = deque(maxlen=40)
    with tempfile.TemporaryDirectory(prefix="cmt-ddp-") as tmp:
        config_file = Path(tmp) / "config.yaml"
        save_yaml(cfg, config_file)
        command = torchrun_command(config_file, processes)
        logger.info("midtrain: %d DDP processes: %s", processes, " ".join(command))
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
            for row in _new_rows(path / "train" / "metrics.jsonl", reported):
                reported = row["step"]
                if progress is not None:
                    progress(row["step"], total, row)
            if finished:
                break
            time.sleep(POLL_SECONDS)
        reader.join(timeout=10)
    manifest = read_manifest(path)
    if proc.returncode != 0 or manifest is None:
        raise RuntimeError(f"torchrun mid-training exited with code {proc.returncode} and "
                           f"{'no' if manifest is None else 'a'} complete artifact at {path}; last output:\n"
                           + "\n".join(tail))
    return StageResult("midtrain", stage_ids(cfg)["midtrain"], path, manifest, cached=False)
