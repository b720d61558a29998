"""``wagle.evaluate``: TOFU-style evaluation of a model on forget / retain / general splits."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from .metrics import (
    FORGET_KIND,
    UTILITY_KIND,
    answer_probability,
    forget_quality,
    greedy_answers,
    model_utility,
    rouge_l_recall,
    truth_ratio,
    truth_ratio_statistic,
)

logger = logging.getLogger(__name__)


@dataclass
class SplitMetrics:
    """Metrics of one split; the per-example lists are kept so a result can serve as a reference."""

    probability: float
    rouge_l: float
    truth_ratio_stat: float
    kind: str
    truth_ratios: list[float] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    rouge_l_recalls: list[float] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)


@dataclass
class EvaluationResult:
    """Per-split metrics, forget quality (None without a reference) and model utility."""

    splits: dict[str, SplitMetrics]
    forget_split: str
    forget_quality: float | None = None
    model_utility: float | None = None

    def to_dict(self) -> dict:
        return {
            "forget_split": self.forget_split,
            "forget_quality": self.forget_quality,
            "model_utility": self.model_utility,
            "splits": {name: asdict(metrics) for name, metrics in self.splits.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> EvaluationResult:
        return cls(
            splits={name: SplitMetrics(**metrics) for name, metrics in data["splits"].items()},
            forget_split=data["forget_split"],
            forget_quality=data.get("forget_quality"),
            model_utility=data.get("model_utility"),
        )

    def forget_truth_ratios(self) -> list[float]:
        return self.splits[self.forget_split].truth_ratios


def _rows(dataset, name: str) -> list[dict]:
    rows = dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)
    if not rows:
        raise ValueError(f"splits[{name!r}]: empty split")
    for column in ("question", "answer", "paraphrased_answer", "perturbed_answer"):
        if column not in rows[0]:
            raise ValueError(f"splits[{name!r}]: missing column {column!r} (TOFU QA schema needed)")
    return rows


def evaluate_split(
    model, tokenizer, rows: list[dict], kind: str, *, batch_size: int, max_new_tokens: int
) -> SplitMetrics:
    """Answer probability, greedy ROUGE-L recall and truth ratios of one split."""
    questions = [r["question"] for r in rows]
    references = [r["answer"] for r in rows]
    probs = answer_probability(model, tokenizer, questions, references, batch_size=batch_size)
    answers = greedy_answers(
        model, tokenizer, questions, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    rouge = rouge_l_recall(answers, references)
    ratios = truth_ratio(model, tokenizer, rows, batch_size=batch_size)
    return SplitMetrics(
        probability=float(probs.mean()),
        rouge_l=float(sum(rouge) / len(rouge)),
        truth_ratio_stat=truth_ratio_statistic(ratios, kind),
        kind=kind,
        truth_ratios=ratios.tolist(),
        probabilities=probs.tolist(),
        rouge_l_recalls=rouge,
        answers=answers,
    )


def evaluate(
    model,
    tokenizer,
    splits: Mapping,
    *,
    reference=None,
    forget_split: str = "forget",
    utility_splits: Sequence[str] = ("retain", "general"),
    batch_size: int = 16,
    max_new_tokens: int = 48,
    max_examples: int | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Evaluate ``model`` on named splits (TOFU QA schema).

    ``reference`` (for forget quality) is a retain model with the same tokenizer, an
    :class:`EvaluationResult` of one, or its forget-split truth ratios; None leaves forget quality
    out. Model utility is the harmonic mean of probability, ROUGE-L and the truth-ratio statistic
    (max(0, 1 - R)) over ``utility_splits``. ``max_examples`` evaluates only the first N of each split.
    """
    if forget_split not in splits:
        raise ValueError(f"splits: no forget split {forget_split!r} (got {sorted(splits)})")
    missing = [s for s in utility_splits if s not in splits]
    if missing:
        raise ValueError(f"utility_splits: {missing} not in splits {sorted(splits)}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    results: dict[str, SplitMetrics] = {}
    for name in tqdm(list(splits), desc="evaluate", disable=not progress, leave=False):
        rows = _rows(splits[name], name)[:max_examples]
        kind = FORGET_KIND if name == forget_split else UTILITY_KIND
        results[name] = evaluate_split(
            model, tokenizer, rows, kind, batch_size=batch_size, max_new_tokens=max_new_tokens
        )
    quality = None
    if reference is not None:
        if isinstance(reference, EvaluationResult):
            reference_ratios = reference.forget_truth_ratios()
        elif isinstance(reference, torch.nn.Module):
            rows = _rows(splits[forget_split], forget_split)[:max_examples]
            reference_ratios = truth_ratio(reference, tokenizer, rows, batch_size=batch_size).tolist()
        else:
            reference_ratios = list(reference)
        quality = forget_quality(results[forget_split].truth_ratios, reference_ratios)
    utility = None
    if utility_splits:
        values = []
        for name in utility_splits:
            m = results[name]
            values += [m.probability, m.rouge_l, m.truth_ratio_stat]
        utility = model_utility(values)
    return EvaluationResult(results, forget_split, quality, utility)
