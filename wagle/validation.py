"""Checks of numeric arguments shared by the library and the CLI; each raises a one-line
:class:`~wagle.errors.UserError` naming the parameter."""

from __future__ import annotations

import math

from wagle.errors import UserError


def check_number(
    name: str, value, *, low: float, integer: bool = False, open_low: bool = False, optional: bool = False
) -> None:
    """Raise unless ``value`` is a finite number (an ``int`` with ``integer``; never a ``bool``) with
    ``value >= low`` (``value > low`` with ``open_low``); ``None`` passes with ``optional``."""
    if optional and value is None:
        return
    kind = int if integer else (int, float)
    bad = isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value)
    if bad or value < low or (open_low and value == low):
        what = ("None or " if optional else "") + ("an integer" if integer else "a number")
        raise UserError(f"{name}: must be {what} {'>' if open_low else '>='} {low}, got {value!r}")


def check_range(option: str, value, low, high=None, *, inclusive_low: bool = True) -> None:
    """Raise unless ``low <= value <= high`` (``low < value`` without ``inclusive_low``; no upper
    bound when ``high`` is None), for values already parsed as numbers (CLI options)."""
    bad = value < low if inclusive_low else value <= low
    if bad or (high is not None and value > high):
        span = f"[{low}, {high}]" if high is not None else (f">= {low}" if inclusive_low else f"> {low}")
        raise UserError(f"{option}: must be {span}, got {value}")


def check_ratio(ratio) -> float:
    """``float(ratio)``, after checking it is a number (not a ``bool``) in ``[0, 1]``."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) <= 1.0:
        raise UserError(f"ratio: must be a number in [0, 1], got {ratio!r}")
    return float(ratio)


def check_gamma(gamma, method: str | None = None) -> None:
    """Raise unless the retain-gradient floor ``gamma`` is a finite number > 0."""
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        where = f" for method={method!r}" if method is not None else ""
        raise UserError(f"gamma: must be a finite number > 0{where}, got {gamma!r}")


def check_seed(seed) -> None:
    """Raise unless ``seed`` is an integer in ``[0, 2^32)`` (what the score hash takes)."""
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise UserError(f"seed: must be an integer in [0, 2^32), got {seed!r}")
