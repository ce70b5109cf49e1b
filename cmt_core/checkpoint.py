"""Checkpoints: one object that saves and loads the same fields, written atomically.

A training run directory holds ``checkpoint.pt`` (everything needed to continue: see ``CheckpointIO``) and
``checkpoint.prev.pt`` (the one before it), ``best.pt`` (the EMA weights with the best evaluation score) and
``metrics.jsonl`` (one JSON row per log step, read by ``read_training_log``). Writers go through
``cmt_core.artifacts.publish`` (unique temporary file, fsync, rename), so a crash never leaves a half-written
file; a file damaged later is detected on load, named, and the previous checkpoint is used instead.

The data position of a run is its step and every random number of a step is drawn from
``cmt_core.rng`` keyed by the step, so no iterator or RNG state is saved: step, weights, EMA and
optimizer fully determine the rest of a run.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import sys
from pathlib import Path

import torch

from cmt_core.artifacts import publish

log = logging.getLogger("cmt")
CHECKPOINT_FILE, BEST_FILE, LOG_FILE = "checkpoint.pt", "best.pt", "metrics.jsonl"


class CheckpointError(RuntimeError):
    """A model or checkpoint file that cannot be read; the message names the file."""


def _save(obj, tmp: Path) -> None:
    # serialised in memory, then written: torch names the archive inside after a path it is given (the
    # temporary names are unique: identical objects would not give identical files), and its zip writer
    # reports a full disk as an opaque position mismatch, where a plain write raises ENOSPC / EFBIG
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with open(tmp, "wb") as f:
        f.write(buffer.getbuffer())


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` through ``publish``: the file at ``path`` is the old one or the complete new one;
    identical objects give byte-identical files."""
    publish(Path(path), lambda tmp: _save(obj, tmp))


def load_file(path: Path, map_location="cpu") -> dict:
    """``torch.load(path, weights_only=True)`` (tensors and plain values only: nothing in the file runs);
    a damaged or foreign file raises ``CheckpointError`` naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))  # weights_only refused an object
        if found is None:  # not a pickle of tensors at all
            raise CheckpointError(f"{path} is unreadable (not a torch.save file of tensors and plain values)") \
                from err
        raise CheckpointError(f"{path} holds the global {found.group(1)}; refused: loading it would run code "
                              "from the file") from err
    except Exception as err:  # torch raises RuntimeError, EOFError, ... for damaged or foreign files
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path} is unreadable ({type(err).__name__}: {first})") from err


def previous(path: Path) -> Path:
    """Where the checkpoint before ``path`` is kept: ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _interned(value):
    """A loaded checkpoint with its dict keys interned, as the literals of the code that made them are: pickle
    memoises by object, so a resumed run's checkpoints are then byte-identical to an uninterrupted run's."""
    if isinstance(value, dict):
        return type(value)((sys.intern(k) if isinstance(k, str) else k, _interned(v)) for k, v in value.items())
    if isinstance(value, list):
        return [_interned(v) for v in value]
    return value


def _set_aside(paths) -> None:
    for path in paths:
        os.replace(path, path.with_name(path.name + ".corrupt"))


class CheckpointIO:
    """Saves and restores named objects that have ``state_dict`` / ``load_state_dict`` plus plain values.

    ``CheckpointIO(model=model, ema=ema.model, optimizer=opt)`` registers the stateful objects;
    ``save(path, step=..., best=...)`` writes their state dicts and the plain values under the same names,
    keeping the checkpoint it replaces as ``previous(path)``; ``load(path)`` restores the objects in place
    and returns the plain values (``None`` without a file); ``check(values) -> problem | None`` vets the plain values
    first (a checkpoint's fields are read from a file anyone may have edited). A file that cannot be read, lacks a
    registered field or whose values ``check`` refuses is named in a warning and the previous checkpoint is loaded
    instead; when neither is usable the
    bad files are renamed ``*.corrupt`` (kept for inspection) and the run starts over (``None``).
    """

    def __init__(self, **stateful):
        self.stateful = stateful

    def save(self, path: Path, **values) -> None:
        clash = set(values) & set(self.stateful)
        if clash:
            raise ValueError(f"checkpoint fields given twice: {sorted(clash)}")
        blob = {**{k: obj.state_dict() for k, obj in self.stateful.items()}, **values}
        path = Path(path)

        def write(tmp: Path) -> None:
            _save(blob, tmp)
            if path.exists():  # the current one becomes the previous one only once the new one is written
                os.replace(path, previous(path))

        publish(path, write)

    def _restore(self, path: Path, map_location, check) -> dict:
        blob = _interned(load_file(path, map_location))
        if not isinstance(blob, dict):
            raise CheckpointError(f"{path} holds a {type(blob).__name__}, not a checkpoint's fields")
        missing = set(self.stateful) - set(blob)
        if missing:
            raise CheckpointError(f"{path} lacks the checkpoint fields {sorted(missing)}")
        values = {k: v for k, v in blob.items() if k not in self.stateful}
        problem = check(values) if check is not None else None
        if problem:  # before any state is loaded: a checkpoint refused leaves the model as it was
            raise CheckpointError(f"{path}: {problem}")
        try:
            for name, obj in self.stateful.items():
                obj.load_state_dict(blob[name])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{path} does not fit this run's model or optimizer: {str(err)[:300]}") from err
        return values

    def load(self, path: Path, map_location="cpu", check=None) -> dict | None:
        bad = []
        for candidate in (Path(path), previous(path)):
            if not candidate.exists():
                continue
            try:
                values = self._restore(candidate, map_location, check)
            except CheckpointError as err:
                log.warning("%s; trying the previous checkpoint", err)
                bad.append(candidate)
                continue
            if bad:
                log.warning("resuming from %s (step %s) instead of the damaged %s (kept as %s.corrupt)", candidate,
                            values.get("step"), bad[0], bad[0].name)
                _set_aside(bad)  # the damaged file must not become the 'previous' one at the next save
            return values
        _set_aside(bad)
        if bad:
            log.warning("no usable checkpoint (%s renamed *.corrupt): starting from step 0",
                        ", ".join(map(str, bad)))
        return None


def read_training_log(path: Path, after: int = -1, up_to: float = float("inf")) -> list[dict]:
    """Rows of a ``metrics.jsonl`` training log with ``after < step <= up_to``.

    ``path`` is the log file or a folder holding ``train/metrics.jsonl`` (a training stage's artifact).
    A missing log gives ``[]``; a line still being written (not valid JSON yet), or one that is not a row with an
    integer step, is skipped.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "train" / LOG_FILE
    if not path.is_file():  # absent (or something else where a log should be: never read)
        return []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        step = row.get("step") if isinstance(row, dict) else None
        if isinstance(step, int) and not isinstance(step, bool) and after < step <= up_to:
            rows.append(row)
    return rows
