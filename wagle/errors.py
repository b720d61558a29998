"""The exception type for mistakes the user can fix (bad arguments, files, data, a mask of another model).

The CLI prints a :class:`UserError` as one ``wagle: error: ...`` line and exits with status 2; any
other exception is a bug (or an environment failure) and keeps its traceback. ``UserError`` is a
``ValueError``, so code that catches ``ValueError`` keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Invalid input the caller can correct; the message names the parameter, option or file."""


def first_line(exc: BaseException, limit: int | None = 200) -> str:
    """The first line of ``exc``'s message (its type name when empty), cut to ``limit`` characters
    (None: uncut): the cause quoted at the end of a one-line error."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


__all__ = ["UserError", "first_line"]
