"""The objective interface and the log-likelihood pieces every objective is built from.

Batches are dicts with ``input_ids``, ``attention_mask``, ``labels`` (prompt tokens labelled -100)
and ``example_index`` (position of each example in its data set, so per-example quantities such as
NPO's reference log-probabilities can be precomputed once and looked up).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from wagle.errors import UserError
from wagle.logprobs import label_logprobs

Batch = Mapping[str, torch.Tensor]


def _model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}


def sequence_logprob(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: sum of log p(y_t | y_<t, x) over label tokens, and the number of label tokens.

    logp = sum_t log softmax(logits_{t-1})[y_t] over t with labels_t != -100 (logits in fp32).
    """
    logits = model(**_model_inputs(batch)).logits
    logp, valid = label_logprobs(logits, batch["labels"], dtype=torch.float32)
    per_token = torch.zeros(valid.shape, dtype=logp.dtype, device=logp.device).masked_scatter(valid, logp)
    return per_token.sum(dim=1), valid.sum(dim=1)


def mean_nll(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Token-mean NLL over all label tokens of the batch (what HF's ``model(labels=...).loss`` gives)."""
    logp, count = sequence_logprob(model, batch)
    return -logp.sum() / count.sum().clamp(min=1)


class Objective:
    """An unlearning loss. Subclasses set ``name`` and implement :meth:`loss`.

    ``prepare`` runs once before training (e.g. NPO's reference log-probabilities); ``state_dict``
    holds whatever it computed, so a resumed run does not recompute it from changed weights.
    """

    name = "objective"
    uses_retain = True
    forget_answer_column = "answer"  # PO trains on refusal answers stored in another column

    def forget_rows(self, dataset, seed: int):
        """The forget rows this objective trains on, built from the given ones (default: unchanged)."""
        return dataset

    def prepare(
        self,
        model: torch.nn.Module,
        forget: Iterable[Batch],
        retain: Iterable[Batch] | None,
        *,
        progress: bool,
    ) -> None:
        """Precompute what the loss needs from the starting model (default: nothing)."""

    def loss(
        self, model: torch.nn.Module, forget: Batch, retain: Batch | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def __call__(self, model, forget, retain):
        return self.loss(model, forget, retain)

    def settings(self) -> dict[str, Any]:
        """The objective's hyperparameters: its public ``bool``/``int``/``float``/``str`` attributes.
        Part of a run's fingerprint, so a run resumed with other settings is refused."""
        return {
            key: value
            for key, value in sorted(vars(self).items())
            if not key.startswith("_") and isinstance(value, (bool, int, float, str))
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise UserError(f"{self.name}: unexpected objective state {sorted(state)}")

    def _retain_term(self, model, retain, weight: float) -> tuple[torch.Tensor, float]:
        if retain is None or weight == 0:
            return torch.zeros((), device=next(model.parameters()).device), 0.0
        nll = mean_nll(model, retain)
        return weight * nll, float(nll.detach())
