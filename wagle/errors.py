"""The exception type for mistakes the user can fix (bad arguments, files, data, a mask of another model).

The CLI prints a :class:`UserError` as one ``wagle: error: ...`` line and exits with status 2; any
other exception is a bug (or an environment failure) and keeps its traceback. ``UserError`` is a
``ValueError``, so code that catches ``ValueError`` keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Invalid input the caller can correct; the message names the parameter, option or file."""


__all__ = ["UserError"]
