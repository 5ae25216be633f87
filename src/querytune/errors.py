"""The errors a user can fix, and the guard that turns them into one clear line and a non-zero exit.

Every module raises these instead of defining its own, so the command line knows which failures are the user's
(a bad key, file, column, label or run directory: one line, exit 2) and which are bugs (a traceback).
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class ConfigError(ValueError):
    """A problem with an experiment file or a command-line flag; the message names the key and the source."""


class DataError(ValueError):
    """A problem with the data: the message names the file or dataset, the split, the column or the label."""


class ModelError(ValueError):
    """A model that cannot be found or loaded; the message names it."""


class RunError(ValueError):
    """A run directory that is missing, unfinished or not a querytune run."""


class ExportError(RunError):
    """An export that cannot be made, or a directory that is not a finished export."""


class PushError(RuntimeError):
    """A failed upload; the local run is untouched and the message says how to retry."""


class MissingExtraError(ModuleNotFoundError):
    """An optional part of querytune used without its extra; the message names the extra and how to install it.

    A ModuleNotFoundError, so that library callers that catch ImportError for optional parts keep working."""


# Errors whose message says all the user needs; anything else keeps its traceback.
USER_ERRORS = (
    ConfigError,
    DataError,
    ModelError,
    RunError,
    PushError,
    MissingExtraError,
    FileNotFoundError,
    ValueError,
)


def run_guarded(fn: Callable[..., int], *args) -> int:
    """Run a command; a user error prints one clear line and exits 2 instead of a traceback."""
    try:
        return fn(*args)
    except USER_ERRORS as err:
        print(f"querytune: error: {err}", file=sys.stderr)
        return 2
