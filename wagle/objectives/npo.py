"""Negative preference optimisation (NPO) and its reference-free variant SimNPO."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from wagle.errors import UserError
from wagle.validation import check_number

from .base import Objective, sequence_logprob


class NPO(Objective):
    """L = -(2/beta) * mean_i logsigmoid(-beta * (logp_theta(y_i|x_i) - logp_ref(y_i|x_i))) + w_r * NLL_r.

    logp is the summed log-probability of the answer tokens. logp_ref comes from the starting model and
    is fixed per example, so it is computed once in :meth:`prepare` (no second model in memory) and
    kept in :meth:`state_dict` for resumed runs.
    """

    name = "npo"

    def __init__(self, beta: float = 0.1, retain_weight: float = 1.0):
        check_number("beta", beta, low=0, open_low=True)
        check_number("retain_weight", retain_weight, low=0)
        self.beta = beta
        self.retain_weight = retain_weight
        self.reference_logprob: torch.Tensor | None = None  # indexed by example_index

    @torch.no_grad()
    def prepare(self, model, forget, retain, *, progress):
        if self.reference_logprob is not None:
            return  # restored from a checkpoint
        values: dict[int, float] = {}
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        for batch in tqdm(forget, desc="NPO reference log-probs", disable=not progress, leave=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            logp, _ = sequence_logprob(model, batch)
            for index, value in zip(batch["example_index"].tolist(), logp.tolist(), strict=True):
                values[index] = value
        model.train(was_training)
        if not values:
            raise UserError("forget: NPO needs a non-empty forget set")
        table = torch.full((max(values) + 1,), float("nan"), dtype=torch.float32)
        for index, value in values.items():
            table[index] = value
        self.reference_logprob = table

    def loss(self, model, forget, retain):
        if self.reference_logprob is None:
            raise RuntimeError("NPO.loss called before prepare(): reference log-probs are missing")
        logp, _ = sequence_logprob(model, forget)
        reference = self.reference_logprob.to(logp.device)[forget["example_index"]]
        log_ratio = logp - reference
        forget_loss = -(2.0 / self.beta) * F.logsigmoid(-self.beta * log_ratio).mean()
        term, nll_r = self._retain_term(model, retain, self.retain_weight)
        return forget_loss + term, {
            "npo_forget": float(forget_loss.detach()),
            "log_ratio": float(log_ratio.detach().mean()),
            "nll_retain": nll_r,
        }

    def state_dict(self):
        return {} if self.reference_logprob is None else {"reference_logprob": self.reference_logprob.clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        extra = set(state) - {"reference_logprob"}
        if extra:
            raise UserError(f"npo: unexpected objective state {sorted(extra)}")
        self.reference_logprob = state.get("reference_logprob")


class SimNPO(Objective):
    """L = -(2/beta) * mean_i logsigmoid(beta * NLL_sum(y_i|x_i) / |y_i| - delta) + w_r * NLL_r.

    Length-normalised and reference-free (beta = 4.5, delta = 0 in common configs).
    """

    name = "simnpo"

    def __init__(self, beta: float = 4.5, delta: float = 0.0, retain_weight: float = 1.0):
        check_number("beta", beta, low=0, open_low=True)
        self.beta, self.delta, self.retain_weight = beta, delta, retain_weight

    def loss(self, model, forget, retain):
        logp, count = sequence_logprob(model, forget)
        normalised_nll = -logp / count.clamp(min=1)
        forget_loss = -(2.0 / self.beta) * F.logsigmoid(self.beta * normalised_nll - self.delta).mean()
        term, nll_r = self._retain_term(model, retain, self.retain_weight)
        return forget_loss + term, {"simnpo_forget": float(forget_loss.detach()), "nll_retain": nll_r}
