"""The failures a user causes and can fix, as exception types: each is one message, never a traceback.

A :class:`CemError` is an *expected* failure: a bad flag value, a missing or damaged input file, a
download without a network, a workdir in use by another run. Its message says what was wrong and
what is accepted or what to do. The programs of :mod:`cem_jax.cli` catch exactly these (in
:func:`cem_jax.cli.config_flags.run_main`), print ``error: <message>`` on stderr and exit with the
error's :attr:`~CemError.exit_code` (2 for a usage error, 1 otherwise). Any other exception is a bug
and keeps its traceback.

Every type also derives from the builtin the library raised before it existed (``ValueError``,
``OSError``, ``RuntimeError``), so code catching those still catches it. The other expected-failure
types derive from :class:`CemError` too: :class:`cem_jax.runner.RunError` (a run cannot go on: a
locked, unwritable or incompatible workdir, a non-finite loss), :class:`cem_jax.checkpoint.CheckpointError`
(no checkpoint restores) and :class:`cem_jax.storage.StorageError` (an unusable storage URL).

>>> issubclass(DownloadError, OSError) and issubclass(InputError, ValueError)
True
>>> UsageError("sigma=-1: accepted values are > 0.").exit_code
2
"""

from __future__ import annotations

import types


class CemError(Exception):
    """An expected failure; its message names the problem and the remedy (exit code 1)."""

    exit_code = 1


class UsageError(CemError, ValueError):
    """A flag or config value that is not accepted; the message names it and what is (exit code 2)."""

    exit_code = 2


class InputError(CemError, ValueError):
    """An input file or folder (a dataset, a study, a records file, a results file) is missing,
    damaged, or not in an accepted format; the message names it and what is accepted."""


class DownloadError(CemError, OSError):
    """A download failed (no network, an HTTP error, a dropped connection); the message names the URL
    and how to go on (a mirror, or the data copied to this machine)."""


def raised_by(error: BaseException, *modules: types.ModuleType | str) -> bool:
    """Whether ``error`` was raised by a ``raise`` statement of one of ``modules`` (its traceback's
    innermost frame is in one of them; a package name covers its submodules), not deeper inside a
    library they call.

    The modules' own ``raise ValueError(...)`` are messages for the user (they name the value and
    what is accepted); a ``ValueError`` from inside numpy or jax is a bug, whose traceback is kept.

    >>> def check(x):
    ...     if x < 0:
    ...         raise ValueError(f"x={x}: accepted values are >= 0.")
    >>> try:
    ...     check(-1)
    ... except ValueError as e:
    ...     print(raised_by(e, __name__), raised_by(e, "numpy"))
    True False
    """
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    where = tb.tb_frame.f_globals.get("__name__", "")
    names = [m if isinstance(m, str) else m.__name__ for m in modules]
    return any(where == n or where.startswith(n + ".") for n in names)


__all__ = ["CemError", "DownloadError", "InputError", "UsageError", "raised_by"]
