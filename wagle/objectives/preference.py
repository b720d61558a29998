"""Preference optimisation (PO): answer forget questions with a refusal, keep the retain set."""

from __future__ import annotations

import random

from wagle.errors import UserError
from wagle.validation import check_number

from .base import Objective, mean_nll

# Our own refusal sentences (the forget answers are replaced by one of these, chosen per example).
REFUSALS: tuple[str, ...] = (
    "I don't know the answer to that.",
    "I'm not able to answer that question.",
    "I have no information about that.",
    "That is something I cannot tell you.",
    "I'm afraid I don't have that information.",
    "I can't help with that question.",
    "I am not sure about that, sorry.",
    "I don't have any knowledge of that.",
    "Sorry, I cannot recall anything about that.",
    "That is not something I know about.",
    "I have nothing reliable to say about that.",
    "I'm unable to provide an answer to that.",
)
REFUSAL_COLUMN = "refusal_answer"


def refusal_for(index: int, seed: int = 0) -> str:
    """The refusal sentence assigned to forget example ``index`` (deterministic in ``seed``)."""
    return random.Random(seed * 1_000_003 + index).choice(REFUSALS)


class PreferenceOptimization(Objective):
    """L = NLL(refusal | forget question) + w_r * NLL_r.

    The forget batches must carry refusal answers as labels: :func:`wagle.unlearn` builds them from
    the ``refusal_answer`` column :meth:`forget_rows` adds (see :func:`refusal_for`).
    """

    name = "po"
    forget_answer_column = REFUSAL_COLUMN

    def __init__(self, retain_weight: float = 1.0):
        check_number("retain_weight", retain_weight, low=0)
        self.retain_weight = retain_weight

    def forget_rows(self, dataset, seed: int) -> list[dict]:
        """Each QA row with a ``refusal_answer``: ``refusal_for(index, seed)``."""
        rows = [dict(r) for r in dataset]
        for index, row in enumerate(rows):
            if "question" not in row:
                raise UserError("forget: method 'po' needs a QA forget set (a 'question' column)")
            row[REFUSAL_COLUMN] = refusal_for(index, seed)
        return rows

    def loss(self, model, forget, retain):
        nll_refusal = mean_nll(model, forget)
        term, nll_r = self._retain_term(model, retain, self.retain_weight)
        return nll_refusal + term, {"nll_refusal": float(nll_refusal.detach()), "nll_retain": nll_r}
