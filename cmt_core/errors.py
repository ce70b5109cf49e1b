"""What a run reports when it cannot go on, and how the command lines answer it.

* ``PreflightError``: bad input found before anything runs or is written (a file, a folder, the device, a teacher
  that does not answer its probe); exit code 2.
* ``InputFileError``: a file the config names is found unusable while a stage reads it; exit code 2.
* ``StageError``: a stage failed while computing; the message names the stage, its folder, the cause and the next
  step; exit code 1.

In every case nothing was marked complete: a rerun resumes from the stage's checkpoints.
"""

from __future__ import annotations

import re


class PreflightError(ValueError):
    """A file or folder the config names for a stage to compute is missing or unusable (found before any stage
    runs)."""


class InputFileError(ValueError):
    """A file the config names cannot be used (found when the stage reads it); the message names the field."""


class StageError(RuntimeError):
    """A stage failed while computing: the message names the stage, its artifact folder, the cause and the
    next step; nothing was marked complete and a rerun resumes from the stage's checkpoints."""


def first_line(err: BaseException) -> str:
    """An exception's message as one line (its type's name when it has none)."""
    return (str(err).splitlines() or [type(err).__name__])[0]


MAX_ECHO = 300  # characters of a value repeated in a message (a path fits; a pasted file does not)
MAX_LINE = 400  # characters of a cause quoted in a message


def brief(value, limit: int = MAX_ECHO) -> str:
    """``repr(value)`` shortened to ``limit`` characters (a huge value is echoed as its start and its length)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def describe(err: BaseException) -> str:
    """An exception as one short line, its type and cause. Torch's advice to retry a refused file with
    ``weights_only=False`` (which would run the file's code) is never repeated: what the file holds is said."""
    text = str(err)
    if "Weights only load failed" in text or "weights_only" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        cause = (f"it holds the global {found.group(1)}, which loading would run" if found else
                 "it is not a file of tensors and plain values")
        return f"{type(err).__name__}: {cause}"
    line = first_line(err).replace("\r", " ")
    line = line if len(line) <= MAX_LINE else line[:MAX_LINE] + "..."
    return f"{type(err).__name__}: {line}"
