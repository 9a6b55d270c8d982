"""Errors of bad input: the ``pale`` command prints these as one line (``pale CMD: error: ...``);
anything else is a bug and keeps its traceback.

* :class:`UserError` -- the base class: something the user gave (a file, an option, a recipe key)
  cannot be used, and the message says what and why.
* :class:`InputError` -- a bad value (also a :class:`ValueError`, so library callers catching
  ``ValueError`` keep working).
* :class:`MissingFileError` -- a file or folder that does not exist (also a :class:`FileNotFoundError`).
* :class:`CheckpointError` -- a weights or checkpoint file that cannot be used (an :class:`InputError`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

__all__ = ["UserError", "InputError", "MissingFileError", "CheckpointError", "settings_error"]


class UserError(Exception):
    """Bad input from the user; the message names the problem in one line."""


class InputError(UserError, ValueError):
    """A value, option or file content that cannot be used."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder that does not exist."""


class CheckpointError(InputError):
    """A weights or checkpoint file that cannot be used (missing, truncated, corrupt, unsafe)."""


@contextlib.contextmanager
def settings_error(what: str) -> Iterator[None]:
    """Inside, a :class:`ValueError` (what constructors raise for bad arguments) becomes an
    :class:`InputError` naming ``what``: for code that builds something from settings the user gave."""
    try:
        yield
    except UserError:
        raise
    except ValueError as err:
        raise InputError(f"{what}: {err}") from err
