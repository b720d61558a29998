"""``wagle.evaluate``: TOFU-style evaluation of a model on forget / retain / general splits.

Per split: mean answer probability ``mean_i P~(answer_i | q_i)`` (on TOFU's real-authors and
world-facts style "option" splits the answer's share of its options,
``P~(answer) / (P~(answer) + sum_j P~(perturbed_j))``), mean ROUGE-L recall of the greedy answers, and
the truth-ratio statistic (``mean(min(R, 1/R))`` on the forget split, ``mean(max(0, 1 - R))``
elsewhere). Across splits: forget quality (KS-test p-value between the
forget-split truth ratios and a reference's, usually the retain model's) and model utility (harmonic
mean of the three metrics of every utility split). With a ``holdout`` set (examples the model
never saw): exact memorisation, extraction strength, membership-inference AUCs and privleak (see
:mod:`wagle.evaluation.privacy`). See :mod:`wagle.evaluation.metrics`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from wagle.data.format import PromptFormat, get_prompt_format
from wagle.errors import UserError
from wagle.validation import check_number

from . import metrics as _metrics
from .metrics import (
    FORGET_KIND,
    OPTIONS_KIND,
    TOFU_COLUMNS,
    UTILITY_KIND,
    eval_mode,
    forget_quality,
    model_utility,
    rouge_l_recall,
    rows_of,
    truth_ratio,
    truth_ratio_statistic,
    truth_ratios_from_nll,
)
from .privacy import MIN_K, PrivacyMetrics, privacy_metrics

_OPTION_COLUMNS = ("question", "answer", "perturbed_answer")  # paraphrased_answer optional

logger = logging.getLogger(__name__)

RESULT_FORMAT = 1
DEFAULT_MAX_NEW_TOKENS = 200  # OpenUnlearning's generation length


def _encode_float(value: float) -> float | str:
    """JSON has no inf/NaN: they are written as the strings "inf", "-inf", "nan"."""
    value = float(value)
    return value if math.isfinite(value) else str(value)


def _decode_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _encode_floats(values: Sequence[float]) -> list[float | str]:
    return [_encode_float(v) for v in values]


@dataclass
class SplitMetrics:
    """Metrics of one split, with the per-example values (so a result can serve as a reference).

    ``probability``: mean of ``exp(-NLL(answer | question))`` (``kind="options"``: of the answer's
    normalised share among its options); ``rouge_l``: mean ROUGE-L recall of the greedy answers;
    ``truth_ratio_stat``: TOFU statistic of the truth ratios for ``kind`` (``"forget"``:
    mean(min(R, 1/R)); ``"utility"`` and ``"options"``: mean(max(0, 1 - R))).
    """

    probability: float
    rouge_l: float
    truth_ratio_stat: float
    kind: str
    truth_ratios: list[float] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    rouge_l_recalls: list[float] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)

    @property
    def num_examples(self) -> int:
        return len(self.truth_ratios)

    def to_dict(self) -> dict[str, Any]:
        return {
            "probability": _encode_float(self.probability),
            "rouge_l": _encode_float(self.rouge_l),
            "truth_ratio_stat": _encode_float(self.truth_ratio_stat),
            "kind": self.kind,
            "num_examples": self.num_examples,
            "truth_ratios": _encode_floats(self.truth_ratios),
            "probabilities": _encode_floats(self.probabilities),
            "rouge_l_recalls": _encode_floats(self.rouge_l_recalls),
            "answers": list(self.answers),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SplitMetrics:
        known = {f.name for f in fields(cls)}
        missing = [k for k in ("probability", "rouge_l", "truth_ratio_stat", "kind") if k not in data]
        if missing:
            raise UserError(f"data: split metrics lack {missing}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                continue
            if key in ("probability", "rouge_l", "truth_ratio_stat"):
                value = float(value)
            elif key in ("truth_ratios", "probabilities", "rouge_l_recalls"):
                value = [float(v) for v in value]
            elif key == "answers":
                value = [str(v) for v in value]
            kwargs[key] = value
        return cls(**kwargs)


@dataclass
class EvaluationResult:
    """Per-split metrics, forget quality (None without a reference) and model utility.

    ``utility_components`` holds the values whose harmonic mean is ``model_utility``
    (``"<split>/probability"``, ``"<split>/rouge_l"``, ``"<split>/truth_ratio_stat"``).
    ``privacy`` holds the memorisation / membership-inference metrics (None without a holdout set);
    ``settings`` the prompt format and generation length the result was measured with.
    """

    splits: dict[str, SplitMetrics]
    forget_split: str
    forget_quality: float | None = None
    model_utility: float | None = None
    utility_splits: list[str] = field(default_factory=list)
    utility_components: dict[str, float] = field(default_factory=dict)
    privacy: PrivacyMetrics | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def forget_truth_ratios(self) -> list[float]:
        """Per-example truth ratios on the forget split (what forget quality compares)."""
        if self.forget_split not in self.splits:
            raise UserError(f"forget_split: {self.forget_split!r} is not among {sorted(self.splits)}")
        return list(self.splits[self.forget_split].truth_ratios)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (non-finite floats become the strings "inf", "-inf", "nan")."""
        return {
            "format": RESULT_FORMAT,
            "forget_split": self.forget_split,
            "forget_quality": None if self.forget_quality is None else _encode_float(self.forget_quality),
            "model_utility": None if self.model_utility is None else _encode_float(self.model_utility),
            "utility_splits": list(self.utility_splits),
            "utility_components": {k: _encode_float(v) for k, v in self.utility_components.items()},
            "splits": {name: metrics.to_dict() for name, metrics in self.splits.items()},
            "privacy": None if self.privacy is None else self.privacy.to_dict(),
            "settings": dict(self.settings),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationResult:
        """Inverse of :meth:`to_dict`."""
        if "splits" not in data or "forget_split" not in data:
            raise UserError("data: not an EvaluationResult dict (needs 'splits' and 'forget_split')")
        return cls(
            splits={name: SplitMetrics.from_dict(m) for name, m in data["splits"].items()},
            forget_split=str(data["forget_split"]),
            forget_quality=_decode_float(data.get("forget_quality")),
            model_utility=_decode_float(data.get("model_utility")),
            utility_splits=list(data.get("utility_splits", [])),
            utility_components={k: float(v) for k, v in data.get("utility_components", {}).items()},
            privacy=PrivacyMetrics.from_dict(data["privacy"]) if data.get("privacy") else None,
            settings=dict(data.get("settings", {})),
        )


def evaluate_split(
    model,
    tokenizer,
    rows,
    kind: str,
    *,
    batch_size: int = 16,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_length: int = 256,
    bar: tqdm | None = None,
    template: str | PromptFormat | None = None,
) -> SplitMetrics:
    """Answer probability, greedy ROUGE-L recall and truth ratios of one split (TOFU QA columns).

    ``kind`` is ``"forget"`` or ``"utility"`` (it picks the truth-ratio statistic) or ``"options"``
    (TOFU's real-authors / world-facts sets: a utility split whose probability is the answer's share
    of its options, ``P~(a) / (P~(a) + sum_j P~(perturbed_j))``, and whose truth ratio compares the
    perturbed answers with the answer itself, as TOFU does there, even when the rows also have a
    ``paraphrased_answer``). The answer, paraphrased and perturbed NLLs are computed in one
    length-sorted pass; prompts are in format ``template``.
    """
    if kind not in (FORGET_KIND, UTILITY_KIND, OPTIONS_KIND):
        raise UserError(f"kind: expected 'forget', 'utility' or 'options', got {kind!r}")
    if kind == OPTIONS_KIND:
        rows = [{**r, "paraphrased_answer": r["answer"]} for r in rows_of(rows, "rows", _OPTION_COLUMNS)]
    rows = rows_of(rows, "rows")
    perturbed = [_metrics._perturbed_of(row, i, "rows") for i, row in enumerate(rows)]
    questions = [row["question"] for row in rows]
    references = [row["answer"] for row in rows]
    n = len(rows)
    flat_q = questions + questions + [q for q, group in zip(questions, perturbed, strict=True) for _ in group]
    flat_a = references + [row["paraphrased_answer"] for row in rows] + [a for g in perturbed for a in g]
    # Looked up through the module so tests can substitute the likelihood.
    nll = _metrics.answer_nll(
        model, tokenizer, flat_q, flat_a, batch_size=batch_size, max_length=max_length, template=template
    ).double()
    if bar is not None:
        bar.update(1)
    perturbed_nll = list(nll[2 * n :].split([len(g) for g in perturbed]))
    probabilities = torch.exp(-nll[:n])
    if kind == OPTIONS_KIND:  # softmax over the options of each question, in log space
        probabilities = torch.stack(
            [
                torch.exp(-a - torch.logsumexp(-torch.cat([a[None], p]), 0))
                for a, p in zip(nll[:n], perturbed_nll, strict=True)
            ]
        )
    ratios = truth_ratios_from_nll(nll[n : 2 * n], perturbed_nll)
    answers = _metrics.greedy_answers(
        model, tokenizer, questions, max_new_tokens=max_new_tokens, batch_size=batch_size, template=template
    )
    if bar is not None:
        bar.update(1)
    rouge = rouge_l_recall(answers, references)
    return SplitMetrics(
        probability=float(probabilities.mean()),
        rouge_l=float(np.mean(rouge)),
        truth_ratio_stat=truth_ratio_statistic(ratios, kind),
        kind=kind,
        truth_ratios=ratios.tolist(),
        probabilities=probabilities.tolist(),
        rouge_l_recalls=rouge,
        answers=answers,
    )


def _reference_ratios(
    reference, tokenizer, forget_rows, *, batch_size: int, max_length: int, template=None
) -> list[float]:
    if isinstance(reference, EvaluationResult):
        return reference.forget_truth_ratios()
    if isinstance(reference, torch.nn.Module):
        return truth_ratio(
            reference, tokenizer, forget_rows, batch_size=batch_size, max_length=max_length, template=template
        ).tolist()
    if isinstance(reference, (str, bytes, Mapping)):
        raise UserError(
            "reference: expected a retain model, an EvaluationResult or its forget-split truth ratios, "
            f"got {type(reference).__name__}"
        )
    if isinstance(reference, torch.Tensor):
        return reference.detach().cpu().double().flatten().tolist()
    try:
        return [float(v) for v in np.asarray(reference, dtype=np.float64).ravel()]
    except (TypeError, ValueError) as error:
        raise UserError(
            "reference: expected a retain model, an EvaluationResult or a sequence of truth ratios, "
            f"got {type(reference).__name__}"
        ) from error


def _other_splits(name: str, names, splits: Mapping, forget_split: str) -> list[str]:
    """``names`` (one name or several) as a list, checked to be splits other than the forget split."""
    names = [names] if isinstance(names, str) else list(names)
    missing = [s for s in names if s not in splits]
    if missing:
        raise UserError(f"{name}: {missing} not in splits {sorted(splits)}")
    if forget_split in names:
        raise UserError(f"{name}: contains the forget split {forget_split!r}")
    return names


def evaluate(
    model,
    tokenizer,
    splits: Mapping[str, Any],
    *,
    reference=None,
    forget_split: str = "forget",
    utility_splits: Sequence[str] = ("retain", "general"),
    option_splits: Sequence[str] = (),
    batch_size: int = 16,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_length: int = 256,
    max_examples: int | None = None,
    progress: bool = True,
    template: str | PromptFormat | None = None,
    holdout=None,
    mia_k: float = MIN_K,
    gradnorm: bool = False,
) -> EvaluationResult:
    """Evaluate ``model`` on named splits (``datasets.Dataset`` or lists of dicts, TOFU QA columns).

    ``reference`` (for forget quality) is a retain model with the same tokenizer, an
    :class:`EvaluationResult` of one, or its forget-split truth ratios (tensor / sequence);
    ``forget_quality = ks_2samp(R_model, R_reference).pvalue`` on ``forget_split``, None without a
    reference. ``model_utility`` is the harmonic mean of probability, ROUGE-L recall and the
    truth-ratio statistic ``mean(max(0, 1 - R))`` of each of ``utility_splits`` (None if empty).
    ``option_splits`` (e.g. TOFU's ``real_authors``, ``world_facts``) are evaluated with
    ``kind="options"`` (see :func:`evaluate_split`); list them in ``utility_splits`` too for TOFU's
    model utility. Splits that are neither forget nor utility are reported but enter no summary.
    ``max_examples`` evaluates only the first N rows of each split. Train/eval modes are restored afterwards.

    ``template`` is the prompt format (a preset of :data:`wagle.data.PROMPT_FORMATS` or a
    :class:`~wagle.data.PromptFormat`; default ``wagle``); generation is greedy, up to
    ``max_new_tokens`` (default 200, as OpenUnlearning). ``holdout`` (QA rows about facts the model
    never saw, e.g. the bundled benchmark's ``holdout10``) adds :class:`PrivacyMetrics`: exact
    memorisation and extraction strength of the forget split, MIA AUCs (loss, zlib, min-k with
    ``k=mia_k``, min-k++, with a reference also the reference-model attack, with ``gradnorm=True``
    the gradient-norm attack) of forget vs holdout, and privleak against the reference's min-k AUC
    (a retain model or an EvaluationResult of one that has privacy metrics).
    """
    if not isinstance(splits, Mapping) or not splits:
        raise UserError("splits: expected a non-empty mapping of split name -> dataset")
    if forget_split not in splits:
        raise UserError(f"forget_split: no forget split {forget_split!r} in splits {sorted(splits)}")
    utility_splits = _other_splits("utility_splits", utility_splits, splits, forget_split)
    option_splits = _other_splits("option_splits", option_splits, splits, forget_split)
    check_number("batch_size", batch_size, low=1, integer=True)
    check_number("max_new_tokens", max_new_tokens, low=1, integer=True)
    check_number("max_examples", max_examples, low=1, integer=True, optional=True)
    fmt = get_prompt_format(template)
    holdout_rows = (
        None if holdout is None else rows_of(holdout, "holdout", ("question", "answer"))[:max_examples]
    )
    rows = {
        name: rows_of(data, f"splits[{name!r}]", _OPTION_COLUMNS if name in option_splits else TOFU_COLUMNS)[
            :max_examples
        ]
        for name, data in splits.items()
    }
    reference_is_model = isinstance(reference, torch.nn.Module)

    results: dict[str, SplitMetrics] = {}
    total = 2 * len(rows) + int(reference_is_model) + int(holdout_rows is not None)
    with (
        eval_mode(model, reference if reference_is_model else None),
        tqdm(total=total, desc="evaluate", unit="step", disable=not progress, leave=False) as bar,
    ):
        for name, split_rows in rows.items():
            bar.set_postfix_str(f"{name} ({len(split_rows)} examples)")
            kind = FORGET_KIND if name == forget_split else UTILITY_KIND
            kind = OPTIONS_KIND if name in option_splits else kind
            results[name] = evaluate_split(
                model,
                tokenizer,
                split_rows,
                kind,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                max_length=max_length,
                bar=bar,
                template=fmt,
            )
        quality = None
        if reference is not None:
            if reference_is_model:
                bar.set_postfix_str("reference truth ratios")
            reference_ratios = _reference_ratios(
                reference,
                tokenizer,
                rows[forget_split],
                batch_size=batch_size,
                max_length=max_length,
                template=fmt,
            )
            if reference_is_model:
                bar.update(1)
            if len(reference_ratios) != len(rows[forget_split]):
                logger.warning(
                    "forget quality: %d reference truth ratios vs %d evaluated forget examples",
                    len(reference_ratios),
                    len(rows[forget_split]),
                )
            own_ratios = results[forget_split].truth_ratios
            if any(math.isnan(v) for v in [*own_ratios, *reference_ratios]):
                logger.warning("forget quality: NaN truth ratios (diverged model?); reported as NaN")
                quality = math.nan
            else:
                quality = forget_quality(own_ratios, reference_ratios)

        privacy = None
        if holdout_rows is not None:
            bar.set_postfix_str(f"privacy (holdout: {len(holdout_rows)} examples)")
            privacy_reference = reference if reference_is_model else None
            if isinstance(reference, EvaluationResult):
                privacy_reference = reference.privacy
            privacy = privacy_metrics(
                model,
                tokenizer,
                rows[forget_split],
                holdout_rows,
                reference=privacy_reference,
                k=mia_k,
                gradnorm=gradnorm,
                batch_size=batch_size,
                max_length=max_length,
                template=fmt,
            )
            bar.update(1)

    components: dict[str, float] = {}
    for name in utility_splits:
        m = results[name]
        components[f"{name}/probability"] = m.probability
        components[f"{name}/rouge_l"] = m.rouge_l
        components[f"{name}/truth_ratio_stat"] = m.truth_ratio_stat
    utility = None
    if components:
        if any(math.isnan(v) for v in components.values()):
            logger.warning("model utility: NaN metric values %s; reported as NaN", components)
            utility = math.nan
        else:
            utility = model_utility(components)
    return EvaluationResult(
        splits=results,
        forget_split=forget_split,
        forget_quality=quality,
        model_utility=utility,
        utility_splits=utility_splits,
        utility_components=components,
        privacy=privacy,
        settings={**fmt.describe(), "max_new_tokens": max_new_tokens, "max_length": max_length},
    )
