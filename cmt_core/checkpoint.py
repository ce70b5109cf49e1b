"""Checkpoints: one object that saves and loads the same fields, written atomically.

A training run directory holds ``checkpoint.pt`` (everything needed to continue: see ``CheckpointIO``),
``best.pt`` (the EMA weights with the best evaluation score) and ``metrics.jsonl`` (one JSON row per log
step, read by ``read_training_log``). Writers go through a temporary file and ``os.replace``, so a crash
never leaves a half-written file.

The data position of a run is its step and every random number of a step is drawn from
``cmt_core.rng`` keyed by the step, so no iterator or RNG state is saved: step, weights, EMA and
optimizer fully determine the rest of a run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

CHECKPOINT_FILE, BEST_FILE, LOG_FILE = "checkpoint.pt", "best.pt", "metrics.jsonl"


def atomic_save(obj, path: Path) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class CheckpointIO:
    """Saves and restores named objects that have ``state_dict`` / ``load_state_dict`` plus plain values.

    ``CheckpointIO(model=model, ema=ema.model, optimizer=opt)`` registers the stateful objects;
    ``save(path, step=..., best=...)`` writes their state dicts and the plain values under the same names;
    ``load(path)`` restores the objects in place and returns the plain values (``None`` without a file).
    A checkpoint whose fields differ from the registered ones is refused with the field names.
    """

    def __init__(self, **stateful):
        self.stateful = stateful

    def save(self, path: Path, **values) -> None:
        clash = set(values) & set(self.stateful)
        if clash:
            raise ValueError(f"checkpoint fields given twice: {sorted(clash)}")
        atomic_save({**{k: obj.state_dict() for k, obj in self.stateful.items()}, **values}, path)

    def load(self, path: Path, map_location="cpu") -> dict | None:
        path = Path(path)
        if not path.exists():
            return None
        blob = torch.load(path, map_location=map_location, weights_only=True)  # tensors and plain values only
        missing = set(self.stateful) - set(blob)
        if missing:
            raise ValueError(f"{path}: checkpoint lacks the fields {sorted(missing)}")
        for name, obj in self.stateful.items():
            obj.load_state_dict(blob[name])
        return {k: v for k, v in blob.items() if k not in self.stateful}


def read_training_log(path: Path, after: int = -1, up_to: float = float("inf")) -> list[dict]:
    """Rows of a ``metrics.jsonl`` training log with ``after < step <= up_to``.

    ``path`` is the log file or a folder holding ``train/metrics.jsonl`` (a training stage's artifact).
    A missing log gives ``[]``; a line still being written (not valid JSON yet) is skipped.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "train" / LOG_FILE
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if after < row.get("step", -1) <= up_to:
            rows.append(row)
    return rows
