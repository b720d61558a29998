"""Gradient ascent and gradient difference."""

from __future__ import annotations

from wagle.validation import check_number

from .base import Objective, mean_nll


class GradAscent(Objective):
    """L = -NLL_f (token-mean NLL on the forget batch, ascended)."""

    name = "grad_ascent"
    uses_retain = False

    def loss(self, model, forget, retain):
        nll_f = mean_nll(model, forget)
        return -nll_f, {"nll_forget": float(nll_f.detach())}


class GradDiff(Objective):
    """L = -NLL_f + retain_weight * NLL_r (retain_weight = 1 in the WAGLE configs)."""

    name = "grad_diff"

    def __init__(self, retain_weight: float = 1.0):
        check_number("retain_weight", retain_weight, low=0)
        self.retain_weight = retain_weight

    def loss(self, model, forget, retain):
        nll_f = mean_nll(model, forget)
        term, nll_r = self._retain_term(model, retain, self.retain_weight)
        return -nll_f + term, {"nll_forget": float(nll_f.detach()), "nll_retain": nll_r}
