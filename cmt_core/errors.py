"""What a run reports when it cannot go on, and how the command lines answer it.

* ``PreflightError``: bad input found before anything runs or is written (a file, a folder, the device, a teacher
  that does not answer its probe); exit code 2.
* ``InputFileError``: a file the config names is found unusable while a stage reads it; exit code 2.
* ``StageError``: a stage failed while computing; the message names the stage, its folder, the cause and the next
  step; exit code 1.

In every case nothing was marked complete: a rerun resumes from the stage's checkpoints. Every command line
(``cmt``, ``cmt-flow``) answers through ``failure_exit`` (and ``config_error`` for a bad configuration): one line
on stderr, the traceback in the run's log file.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from pathlib import Path


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


# --------------------------------------------------------------------------------- how the command lines answer


def config_message(err: ValueError) -> str:
    """An invalid configuration as one line naming each bad field, its problem and the value given. ``err``
    is pydantic's ``ValidationError`` (a ``ValueError``) or a plain ``ValueError``."""
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        problems = [(f"{'.'.join(map(str, e['loc']))}: " if e["loc"] else "")
                    + e["msg"].removeprefix("Value error, ").replace("\n", " ")
                    + ("" if isinstance(e["input"], dict) else f" (got {brief(e['input'])})")  # a section: its rule
                    for e in err.errors()]
    else:
        problems = [str(err).replace("\n", " ")]
    return "invalid configuration: " + "; ".join(problems)


def config_error(err: ValueError) -> int:
    """``config_message`` on stderr; the exit code 2."""
    print(config_message(err), file=sys.stderr)
    return 2


def input_error(err: Exception, log_file: Path | None = None) -> int:
    """Bad input (a missing or unusable file, found before or while a stage reads it): one line naming the
    field on stderr, the traceback only in the run's log file; the exit code 2."""
    if log_file is not None:
        logging.getLogger("traceback").info("invalid input", exc_info=err)  # not shown on the console
    print(f"invalid input: {_line(err)}" + (f" (details: {log_file})" if log_file else ""), file=sys.stderr)
    return 2


def _line(err: Exception) -> str:
    """The message of one of our errors (they name what is wrong) or the type and cause of any other, one line."""
    if isinstance(err, (PreflightError, InputFileError, StageError)):
        return str(err).replace("\n", " ")
    return describe(err)


def runtime_error(err: Exception, log_file: Path | None, debug: bool = False) -> int:
    """A failure while a stage computed: one line on stderr (``StageError`` names the stage, its folder, the
    cause and the next step), the traceback in the run's log file (and on stderr with ``debug``); exit code 1."""
    logging.getLogger("traceback").info("run failed", exc_info=err)  # not shown on the console
    if debug:
        traceback.print_exception(err)
    print(f"failed: {_line(err)}" + (f" (details: {log_file})" if log_file else ""), file=sys.stderr)
    return 1


def failure_exit(err: Exception, log_file: Path | None = None, debug: bool = False) -> int:
    """The one answer of every command to an exception out of a run: bad input found before anything ran
    (``PreflightError``) or while a stage read a file (``InputFileError``): exit 2; anything else: a stage
    failed (``StageError``), exit 1 (``input_error``, ``runtime_error``)."""
    if isinstance(err, PreflightError):
        return input_error(err)
    if isinstance(err, InputFileError):  # the stage stopped before marking anything complete
        return input_error(err, log_file)
    return runtime_error(err, log_file, debug)
