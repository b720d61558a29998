"""Unlearning objectives as small composable pieces (see each class for its formula)."""

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


def make_objective(name: str, **kwargs) -> Objective:
    """Build an objective by name (``grad_ascent``, ``grad_diff``, ``npo``, ``simnpo``, ``po``, ``rmu``)."""
    key = name.lower().replace("-", "_")
    aliases = {"ga": "grad_ascent", "gradascent": "grad_ascent", "graddiff": "grad_diff", "gd": "grad_diff"}
    key = aliases.get(key, key)
    if key not in OBJECTIVES:
        raise UserError(f"method: unknown unlearning method {name!r}; expected one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[key](**kwargs)


__all__ = [
    "GradAscent",
    "GradDiff",
    "NPO",
    "OBJECTIVES",
    "Objective",
    "PreferenceOptimization",
    "REFUSALS",
    "RMU",
    "SimNPO",
    "make_objective",
    "mean_nll",
    "refusal_for",
    "sequence_logprob",
]
