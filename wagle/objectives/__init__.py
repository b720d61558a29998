"""Unlearning objectives as small composable pieces (see each class for its formula).

:data:`OBJECTIVES` is the registry: adding an objective is one module with an :class:`Objective`
subclass and one entry here; the CLI, ``wagle.unlearn``, the demo and ``wagle compare`` read it.
"""

import inspect

from wagle.errors import UserError

from .base import Objective, mean_nll, sequence_logprob
from .gradient_ascent import GradAscent, GradDiff
from .npo import NPO, SimNPO
from .preference import REFUSALS, PreferenceOptimization, refusal_for
from .rmu import RMU

OBJECTIVES: dict[str, type[Objective]] = {
    "grad_ascent": GradAscent,
    "grad_diff": GradDiff,
    "npo": NPO,
    "simnpo": SimNPO,
    "po": PreferenceOptimization,
    "rmu": RMU,
}


ALIASES = {"ga": "grad_ascent", "gradascent": "grad_ascent", "graddiff": "grad_diff", "gd": "grad_diff"}


def objective_name(name: str) -> str:
    """The registry key of ``name`` (case, ``-``/``_`` and the aliases ``ga``/``gd``/... accepted)."""
    key = name.lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in OBJECTIVES:
        raise UserError(f"method: unknown unlearning method {name!r}; expected one of {sorted(OBJECTIVES)}")
    return key


def objective_options(name: str) -> tuple[str, ...]:
    """The keyword arguments objective ``name``'s constructor takes (e.g. ``("beta", "retain_weight")``
    for NPO), so callers pass a shared option such as ``--beta`` only to objectives that have it."""
    signature = inspect.signature(OBJECTIVES[objective_name(name)].__init__)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in signature.parameters.values() if p.name != "self" and p.kind in kinds)


def make_objective(name: str, **kwargs) -> Objective:
    """Build a registered objective by name (see :data:`OBJECTIVES`) with its keyword arguments."""
    return OBJECTIVES[objective_name(name)](**kwargs)


__all__ = [
    "GradAscent",
    "GradDiff",
    "NPO",
    "ALIASES",
    "OBJECTIVES",
    "Objective",
    "PreferenceOptimization",
    "REFUSALS",
    "RMU",
    "SimNPO",
    "make_objective",
    "objective_name",
    "objective_options",
    "mean_nll",
    "refusal_for",
    "sequence_logprob",
]
