"""What a run reports when it cannot go on, and how the command lines answer it.

* ``PreflightError``: bad input found before anything runs or is written (a file, a folder, the device, a teacher
  that does not answer its probe); exit code 2.
* ``InputFileError``: a file the config names is found unusable while a stage reads it; exit code 2.
* ``StageError``: a stage failed while computing; the message names the stage, its folder, the cause and the next
  step; exit code 1.

In every case nothing was marked complete: a rerun resumes from the stage's checkpoints.
"""

from __future__ import annotations


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
