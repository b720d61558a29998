"""Memorisation and membership-inference metrics, as OpenUnlearning's TOFU/MUSE suites define them.

One forward pass per example gives, over its target tokens ``y_1..y_T`` (answer and EOS, as encoded
for training), the log-probabilities ``l_t = log p(y_t | context)``, whether the argmax token is
``y_t``, and the moments of the next-token distribution ``mu_t = sum_v p_v log p_v`` and
``s2_t = sum_v p_v (log p_v)^2 - mu_t^2``. Every score except gradnorm is derived from these.
Following OpenUnlearning, the token-level scores (min-k, min-k++, exact memorisation, extraction
strength, gradnorm) drop the last target token (the EOS); the loss-based ones keep it.

Per-example scores (lower = "looks more like training data"):

* ``loss``       ``-(1/T) sum_t l_t``;
* ``zlib``       ``loss / len(zlib.compress(text.encode("utf-8")))``, text = the decoded target tokens;
* ``min_k``      ``-mean`` of the ``max(1, int(k * n))`` smallest ``l_t`` (n = T - 1 tokens; k = 0.4);
* ``min_k++``    the same over ``(l_t - mu_t) / sqrt(max(s2_t, 1e-6))``;
* ``reference``  ``loss(model) - loss(reference model)`` (the retain model as reference);
* ``gradnorm``   mean over parameters of ``||d loss' / d theta||_p`` (p = 2), ``loss'`` the mean NLL
  of the n tokens, one example at a time.

MIA AUC of forget vs holdout: the ROC AUC with holdout as the positive class, i.e.
``P(score_holdout > score_forget) + P(tie) / 2``: 1 when the forget set looks far more "seen" than the
holdout, 0.5 when they are indistinguishable (a retain model's value). ``privleak =
((1 - AUC) - (1 - AUC_retain)) / (1 - AUC_retain + 1e-10) * 100`` on the min-k AUC.

Exact memorisation: ``(1/n) sum_t [argmax_t = y_t]``. Extraction strength: ``1 - k*/n`` with ``k*``
the first position from which every remaining argmax matches (``n - 1`` when none does, as
OpenUnlearning's loop leaves it; so the smallest value is ``1/n``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from wagle.data.batching import pad_id_of
from wagle.data.format import IGNORE_INDEX, PromptFormat
from wagle.errors import UserError
from wagle.logprobs import label_log_softmax, label_logprobs, shifted_targets
from wagle.validation import check_number

from .metrics import _input_device, batched_logits, encode_answers, eval_mode

MIN_K = 0.4
SIGMA_FLOOR = 1e-6
FORWARD_ATTACKS = ("loss", "zlib", "min_k", "min_k++")


@dataclass
class TokenStats:
    """Per-target-token statistics of one example (float64 CPU tensors of length T)."""

    logprobs: torch.Tensor
    hits: torch.Tensor
    mu: torch.Tensor
    var: torch.Tensor
    text: str


@torch.no_grad()
def token_statistics(
    model,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 256,
    template: str | PromptFormat | None = None,
) -> list[TokenStats]:
    """Per-token log-probabilities, argmax agreement and vocabulary moments of each answer (one
    forward pass per length-sorted batch; log-softmax and moments in float64, one example at a time)."""
    encoded = encode_answers(tokenizer, questions, answers, max_length, template)
    check_number("batch_size", batch_size, low=1, integer=True)
    pad_id = pad_id_of(tokenizer)
    out: list[TokenStats | None] = [None] * len(encoded)
    with eval_mode(model):
        for index, batch, logits in batched_logits(model, encoded, pad_id, batch_size):
            for row, i in enumerate(index):
                logp, y, _ = label_log_softmax(logits[row], batch["labels"][row], dtype=torch.float64)
                p = logp.exp()
                mu = (p * logp).sum(-1)
                var = (p * logp.square()).sum(-1) - mu.square()
                out[i] = TokenStats(
                    logprobs=logp.gather(1, y[:, None]).squeeze(1).cpu(),
                    hits=(logp.argmax(-1) == y).cpu(),
                    mu=mu.cpu(),
                    var=var.cpu(),
                    text=tokenizer.decode(y.tolist(), skip_special_tokens=True),
                )
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------- per-example scores
def loss_score(stats: TokenStats) -> float:
    """Mean NLL over all target tokens (EOS included)."""
    return float(-stats.logprobs.mean())


def zlib_score(stats: TokenStats) -> float:
    """``loss / len(zlib.compress(text))`` (text: the decoded target tokens, UTF-8)."""
    return loss_score(stats) / len(zlib.compress(stats.text.encode("utf-8")))


def _bottom_k_mean(values: torch.Tensor, k: float) -> float:
    if values.numel() == 0:
        return 0.0
    count = max(1, int(values.numel() * k))
    return float(-torch.sort(values).values[:count].mean())


def min_k_score(stats: TokenStats, k: float = MIN_K) -> float:
    """``-mean`` of the ``max(1, int(k * n))`` lowest token log-probs (EOS dropped; 0 when n = 0)."""
    return _bottom_k_mean(stats.logprobs[:-1], k)


def min_k_plus_plus_score(stats: TokenStats, k: float = MIN_K) -> float:
    """Min-k over ``(log p(y_t) - mu_t) / sqrt(max(s2_t, 1e-6))`` (EOS dropped)."""
    z = (stats.logprobs[:-1] - stats.mu[:-1]) / stats.var[:-1].clamp(min=SIGMA_FLOOR).sqrt()
    return _bottom_k_mean(z, k)


def exact_memorization_score(stats: TokenStats) -> float | None:
    """Share of target tokens (EOS dropped) that are the model's argmax; None with no token."""
    hits = stats.hits[:-1]
    return None if hits.numel() == 0 else float(hits.double().mean())


def extraction_strength_score(stats: TokenStats) -> float:
    """``1 - k*/n`` with ``k*`` the first position whose whole suffix is argmax-predicted (``n - 1``
    if none is, as OpenUnlearning's loop leaves it); 0 with no token."""
    hits = stats.hits[:-1].tolist()
    n = len(hits)
    if n == 0:
        return 0.0
    k = n - 1
    for position in range(n):
        if all(hits[position:]):
            k = position
            break
    return 1.0 - k / n


def attack_scores(stats: Sequence[TokenStats], k: float = MIN_K) -> dict[str, list[float]]:
    """The forward-pass attack scores of every example: ``loss``, ``zlib``, ``min_k``, ``min_k++``."""
    return {
        "loss": [loss_score(s) for s in stats],
        "zlib": [zlib_score(s) for s in stats],
        "min_k": [min_k_score(s, k) for s in stats],
        "min_k++": [min_k_plus_plus_score(s, k) for s in stats],
    }


def gradnorm_scores(
    model,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    p: float = 2.0,
    max_length: int = 256,
    template: str | PromptFormat | None = None,
) -> list[float]:
    """Per example: the mean over parameters of ``||grad||_p`` of the mean NLL of its target tokens
    (EOS dropped), one example per backward pass. The model runs in eval mode (OpenUnlearning
    switches to train mode, which differs only for models with dropout); existing ``.grad`` values
    and the modes are restored."""
    if p not in (1, 2, 1.0, 2.0, math.inf):
        raise UserError(f"p: expected 1, 2 or inf, got {p!r}")
    encoded = encode_answers(tokenizer, questions, answers, max_length, template)
    params = [q for q in model.parameters() if q.requires_grad]
    if not params:
        raise UserError("model: has no parameter that requires a gradient (gradnorm needs gradients)")
    saved = [q.grad for q in params]
    device = _input_device(model)
    scores = []
    try:
        with eval_mode(model):
            for example in encoded:
                for q in params:
                    q.grad = None
                ids = torch.tensor([example["input_ids"]], device=device)
                logits = model(input_ids=ids, use_cache=False).logits[0]
                labels = torch.tensor(example["labels"], device=logits.device)
                answer = shifted_targets(logits, labels)[1].nonzero().squeeze(1)
                if answer.numel() < 2:
                    raise UserError("answers: gradnorm needs at least one answer token besides EOS")
                labels[1 + answer[-1]] = IGNORE_INDEX  # EOS dropped
                logp, _ = label_logprobs(logits, labels, dtype=torch.float32)
                (-logp.mean()).backward()
                norms = [q.grad.detach().double().norm(p=p) for q in params if q.grad is not None]
                scores.append(float(torch.stack(norms).mean()))
    finally:
        for q, grad in zip(params, saved, strict=True):
            q.grad = grad
    return scores


# ------------------------------------------------------------------------------------- summaries
def mia_auc(forget_scores, holdout_scores) -> float:
    """ROC AUC with holdout as the positive class: ``P(s_holdout > s_forget) + P(s_holdout = s_forget) / 2``
    (the Mann-Whitney U statistic over ``n_f * n_h``, from average ranks)."""
    from scipy.stats import rankdata

    forget = np.asarray(forget_scores, dtype=np.float64).ravel()
    holdout = np.asarray(holdout_scores, dtype=np.float64).ravel()
    if forget.size == 0 or holdout.size == 0:
        raise UserError("mia_auc: needs at least one forget and one holdout score")
    if np.isnan(forget).any() or np.isnan(holdout).any():
        raise UserError("mia_auc: scores contain NaN")
    ranks = rankdata(np.concatenate([forget, holdout]))
    u = ranks[forget.size :].sum() - holdout.size * (holdout.size + 1) / 2
    return float(u / (forget.size * holdout.size))


def privleak(auc: float, retain_auc: float) -> float:
    """``((1 - AUC) - (1 - AUC_retain)) / (1 - AUC_retain + 1e-10) * 100`` (0 = as private as the
    retain model; negative = the forget set still looks seen)."""
    score, ref = 1.0 - float(auc), 1.0 - float(retain_auc)
    return (score - ref) / (ref + 1e-10) * 100.0


def _floats(values) -> list[float]:
    return [float(v) for v in values]


@dataclass
class PrivacyMetrics:
    """Memorisation of the forget split and membership-inference AUCs of forget vs holdout.

    ``auc`` maps attack -> AUC (``loss``, ``zlib``, ``min_k``, ``min_k++``, and ``reference`` /
    ``gradnorm`` when computed); ``privleak`` is None without a retain model's min-k AUC. The
    per-example scores are kept so that a result can serve as a reference.
    """

    auc: dict[str, float]
    exact_memorization: float
    extraction_strength: float
    privleak: float | None = None
    retain_min_k_auc: float | None = None
    k: float = MIN_K
    forget_scores: dict[str, list[float]] = field(default_factory=dict)
    holdout_scores: dict[str, list[float]] = field(default_factory=dict)
    exact_memorizations: list[float] = field(default_factory=list)
    extraction_strengths: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from .evaluate import _encode_float

        def enc(value):
            return None if value is None else _encode_float(value)

        return {
            "auc": {k: enc(v) for k, v in self.auc.items()},
            "exact_memorization": enc(self.exact_memorization),
            "extraction_strength": enc(self.extraction_strength),
            "privleak": enc(self.privleak),
            "retain_min_k_auc": enc(self.retain_min_k_auc),
            "k": self.k,
            "forget_scores": {k: [enc(x) for x in v] for k, v in self.forget_scores.items()},
            "holdout_scores": {k: [enc(x) for x in v] for k, v in self.holdout_scores.items()},
            "exact_memorizations": [enc(x) for x in self.exact_memorizations],
            "extraction_strengths": [enc(x) for x in self.extraction_strengths],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyMetrics:
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                continue
            if key == "auc":
                value = {k: float(v) for k, v in value.items()}
            elif key in ("forget_scores", "holdout_scores"):
                value = {k: _floats(v) for k, v in value.items()}
            elif key in ("exact_memorizations", "extraction_strengths"):
                value = _floats(value)
            elif value is not None:
                value = float(value)
            kwargs[key] = value
        return cls(**kwargs)


def privacy_metrics(
    model,
    tokenizer,
    forget: Sequence[Mapping[str, Any]],
    holdout: Sequence[Mapping[str, Any]],
    *,
    reference=None,
    k: float = MIN_K,
    gradnorm: bool = False,
    batch_size: int = 16,
    max_length: int = 256,
    template: str | PromptFormat | None = None,
) -> PrivacyMetrics:
    """Exact memorisation and extraction strength on ``forget``; MIA AUCs of ``forget`` vs ``holdout``
    (rows with ``question`` and ``answer``); privleak and the reference attack against ``reference``:
    a retain model (same tokenizer), or the :class:`PrivacyMetrics` of one (its ``loss`` scores and
    min-k AUC), or None."""
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0.0 < k <= 1.0:
        raise UserError(f"k: must be a number in (0, 1], got {k!r}")
    questions = [r["question"] for r in forget] + [r["question"] for r in holdout]
    answers = [r["answer"] for r in forget] + [r["answer"] for r in holdout]
    n = len(forget)
    kw = {"batch_size": batch_size, "max_length": max_length, "template": template}
    stats = token_statistics(model, tokenizer, questions, answers, **kw)
    scores = attack_scores(stats, k)
    ref_min_k_auc = None
    if isinstance(reference, torch.nn.Module):
        ref_scores = attack_scores(token_statistics(reference, tokenizer, questions, answers, **kw), k)
        ref_loss = ref_scores["loss"]
        ref_min_k_auc = mia_auc(ref_scores["min_k"][:n], ref_scores["min_k"][n:])
    elif isinstance(reference, PrivacyMetrics):
        ref_loss = reference.forget_scores.get("loss", []) + reference.holdout_scores.get("loss", [])
        if len(reference.forget_scores.get("loss", [])) != n or len(ref_loss) != len(questions):
            raise UserError(
                "reference: its privacy scores cover another number of forget/holdout examples "
                f"({len(reference.forget_scores.get('loss', []))} forget, {len(ref_loss)} in all; "
                f"expected {n} and {len(questions)})"
            )
        ref_min_k_auc = reference.auc.get("min_k")
    elif reference is None:
        ref_loss = None
    else:
        raise UserError(
            f"reference: expected a retain model or its PrivacyMetrics, got {type(reference).__name__}"
        )
    if ref_loss is not None:
        scores["reference"] = [a - b for a, b in zip(scores["loss"], ref_loss, strict=True)]
    if gradnorm:
        scores["gradnorm"] = gradnorm_scores(
            model, tokenizer, questions, answers, max_length=max_length, template=template
        )
    auc = {name: mia_auc(values[:n], values[n:]) for name, values in scores.items()}
    em = [exact_memorization_score(s) for s in stats[:n]]
    em = [v for v in em if v is not None]
    es = [extraction_strength_score(s) for s in stats[:n]]
    return PrivacyMetrics(
        auc=auc,
        exact_memorization=float(np.mean(em)) if em else math.nan,
        extraction_strength=float(np.mean(es)),
        privleak=None if ref_min_k_auc is None else privleak(auc["min_k"], ref_min_k_auc),
        retain_min_k_auc=ref_min_k_auc,
        k=float(k),
        forget_scores={name: values[:n] for name, values in scores.items()},
        holdout_scores={name: values[n:] for name, values in scores.items()},
        exact_memorizations=em,
        extraction_strengths=es,
    )
