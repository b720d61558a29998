"""TOFU-style metrics (Maini et al., 2024) as pure functions.

Notation: for a question ``q`` and an answer ``a`` with answer tokens ``y_1..y_T`` (EOS included,
exactly as :func:`wagle.data.format.encode_qa` builds training examples, in the prompt format
``template`` that every function here takes: a preset name or a :class:`~wagle.data.PromptFormat`),

* answer NLL      ``NLL(a|q) = -(1/T) * sum_t log p(y_t | q, y_<t)``  (length-normalised);
* probability     ``P~(a|q) = exp(-NLL(a|q))``;
* truth ratio     ``R = P~(perturbed) / P~(paraphrased)
  = exp(NLL(paraphrased) - (1/K) * sum_k NLL(perturbed_k))`` (perturbed answers averaged in log space);
* truth-ratio statistic: ``mean(min(R, 1/R))`` on the forget split, ``mean(max(0, 1 - R))`` on
  retain/utility splits;
* ROUGE-L recall  ``LCS(prediction, reference) / len(reference)`` (tokens, Porter-stemmed);
* forget quality  p-value of the two-sample Kolmogorov-Smirnov test between two truth-ratio samples;
* model utility   harmonic mean ``n / sum_i (1 / v_i)`` of the utility metric values (0 if any is 0).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from wagle.data.batching import pad_id_of
from wagle.data.format import IGNORE_INDEX, PromptFormat, get_prompt_format, pad_batch
from wagle.errors import UserError
from wagle.logprobs import label_logprobs, row_sums
from wagle.positions import check_examples, check_sequence_length
from wagle.validation import check_number

logger = logging.getLogger(__name__)

FORGET_KIND, UTILITY_KIND, OPTIONS_KIND = "forget", "utility", "options"
_UTILITY_ALIASES = (UTILITY_KIND, "retain", OPTIONS_KIND)
TOFU_COLUMNS = ("question", "answer", "paraphrased_answer", "perturbed_answer")


# --------------------------------------------------------------------------------------------- helpers
def _input_device(model) -> torch.device:
    """Device of the input embeddings (the first device of a model dispatched over several)."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def batched_logits(
    model, encoded: Sequence[Mapping[str, list[int]]], pad_id: int, batch_size: int
) -> Iterator[tuple[list[int], dict[str, torch.Tensor], torch.Tensor]]:
    """``(indices, padded batch, logits)`` for ``encoded`` in length order, ``batch_size`` examples a
    forward pass (inputs on the input embeddings' device, no KV cache). Callers set the eval mode and
    no-grad."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    device = _input_device(model)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = pad_batch([encoded[i] for i in index], pad_id)
        logits = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            use_cache=False,
        ).logits
        yield index, batch, logits


@contextlib.contextmanager
def eval_mode(*models) -> Iterator[None]:
    """Put ``models`` in eval mode and restore every submodule's own train/eval flag afterwards."""
    saved = [(m, m.training) for model in models if model is not None for m in model.modules()]
    try:
        for model in models:
            if model is not None:
                model.eval()
        yield
    finally:
        for module, training in saved:
            module.training = training


def _str_list(values, name: str) -> list[str]:
    if isinstance(values, str):
        raise UserError(f"{name}: expected a sequence of strings, got a single string")
    out = list(values)
    for i, value in enumerate(out):
        if not isinstance(value, str):
            raise UserError(f"{name}[{i}]: expected str, got {type(value).__name__}")
    return out


def rows_of(dataset, name: str = "dataset", columns: Sequence[str] = TOFU_COLUMNS) -> list[dict[str, Any]]:
    """Rows of a ``datasets.Dataset`` (or a sequence of dicts), checking it is non-empty with ``columns``."""
    column_names = getattr(dataset, "column_names", None)
    rows = dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)
    if not rows:
        raise UserError(f"{name}: empty split")
    present = set(column_names) if column_names is not None else set(rows[0])
    missing = [c for c in columns if c not in present]
    if missing:
        raise UserError(f"{name}: missing column(s) {missing} (TOFU QA columns needed: {list(columns)})")
    return rows


def _perturbed_of(row: Mapping[str, Any], index: int, name: str) -> list[str]:
    perturbed = row["perturbed_answer"]
    if isinstance(perturbed, str):  # a single perturbed answer given as a bare string
        perturbed = [perturbed]
    perturbed = list(perturbed) if perturbed is not None else []
    if not perturbed or not all(isinstance(p, str) for p in perturbed):
        raise UserError(f"{name}: row {index} needs a non-empty list of str in 'perturbed_answer'")
    return perturbed


# --------------------------------------------------------------------------------------- likelihoods
def encode_answers(
    tokenizer, questions, answers, max_length: int, template: str | PromptFormat | None
) -> list[dict[str, list[int]]]:
    """Each (question, answer) encoded in prompt format ``template`` (answer tokens labelled, the
    prompt -100), after checking both are lists of str of one length and every answer has a token."""
    questions, answers = _str_list(questions, "questions"), _str_list(answers, "answers")
    if len(questions) != len(answers):
        raise UserError(f"questions/answers: lengths differ ({len(questions)} vs {len(answers)})")
    fmt = get_prompt_format(template)
    encoded = [fmt.encode(tokenizer, q, a, max_length) for q, a in zip(questions, answers, strict=True)]
    for i, example in enumerate(encoded):
        if all(label == IGNORE_INDEX for label in example["labels"]):
            raise UserError(f"answers[{i}]: encodes to no answer token (empty answer and no eos token)")
    return encoded


@torch.no_grad()
def answer_nll(
    model,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 256,
    template: str | PromptFormat | None = None,
) -> torch.Tensor:
    """Length-normalised NLL of each answer given its question.

    ``NLL_i = -(1/T_i) * sum_{t in answer_i} log softmax(logits_{t-1})[y_t]`` over the answer tokens
    only (EOS included, prompt excluded), with the prompt/answer encoding of
    :func:`~wagle.data.format.encode_qa` (answers truncated to ``max_length`` tokens in all). The
    model runs in eval mode without gradients (its modes are restored); logits are upcast to fp32, so
    fp32 and bf16 models work on any device. Examples are batched in length order to limit padding;
    the result is independent of batching. Returns a float32 CPU tensor of shape ``(len(questions),)``.
    """
    encoded = encode_answers(tokenizer, questions, answers, max_length, template)
    check_number("batch_size", batch_size, low=1, integer=True)
    out = torch.zeros(len(encoded), dtype=torch.float32)
    if not encoded:
        return out
    pad_id = pad_id_of(tokenizer)
    check_examples(model, encoded, role="evaluation")
    with eval_mode(model):
        for index, batch, logits in batched_logits(model, encoded, pad_id, batch_size):
            logp, valid = label_logprobs(logits, batch["labels"], dtype=torch.float32)
            sums = row_sums(-logp, valid, dtype=torch.float32)
            out[torch.tensor(index)] = (sums / valid.sum(1).float()).cpu()
    return out


def answer_probability(
    model,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 256,
    template: str | PromptFormat | None = None,
) -> torch.Tensor:
    """``P~_i = exp(-NLL_i)``: the geometric-mean per-token probability of each answer (fp32, CPU)."""
    nll = answer_nll(
        model, tokenizer, questions, answers, batch_size=batch_size, max_length=max_length, template=template
    )
    return torch.exp(-nll)


def truth_ratios_from_nll(
    nll_paraphrased: torch.Tensor | Sequence[float], nll_perturbed: Sequence[torch.Tensor | Sequence[float]]
) -> torch.Tensor:
    """``R_i = exp(NLL(paraphrased_i) - mean_k NLL(perturbed_ik))``, computed in float64 (so that it
    overflows to inf only past a log-ratio of ~709). ``nll_perturbed[i]`` holds example i's K_i NLLs."""
    para = torch.as_tensor(nll_paraphrased, dtype=torch.float64).flatten()
    groups = [torch.as_tensor(g, dtype=torch.float64).flatten() for g in nll_perturbed]
    if len(groups) != para.numel():
        raise UserError(f"nll_perturbed: {len(groups)} groups for {para.numel()} paraphrased answers")
    if any(g.numel() == 0 for g in groups):
        raise UserError("nll_perturbed: every example needs at least one perturbed NLL")
    pert = torch.tensor([float(g.mean()) for g in groups], dtype=torch.float64)
    return torch.exp(para - pert)


def truth_ratio(
    model,
    tokenizer,
    dataset,
    *,
    batch_size: int = 16,
    max_length: int = 256,
    template: str | PromptFormat | None = None,
) -> torch.Tensor:
    """Per-example truth ratio ``R = P~(perturbed) / P~(paraphrased)``.

    ``P~(perturbed)`` is the geometric mean over the K perturbed answers (their NLLs are averaged), so
    ``R_i = exp(NLL(paraphrased_i | q_i) - (1/K_i) * sum_k NLL(perturbed_ik | q_i))``. R < 1 means the
    model prefers the correct (paraphrased) answer. ``dataset`` needs the columns ``question``,
    ``paraphrased_answer`` (str) and ``perturbed_answer`` (list of str; a bare str counts as one).
    Returns a float64 CPU tensor.
    """
    rows = rows_of(dataset, "dataset", ("question", "paraphrased_answer", "perturbed_answer"))
    perturbed = [_perturbed_of(row, i, "dataset") for i, row in enumerate(rows)]
    questions = [row["question"] for row in rows]
    # One pass over paraphrased and perturbed answers together: fuller, length-sorted batches.
    flat_q = questions + [q for q, group in zip(questions, perturbed, strict=True) for _ in group]
    flat_a = [row["paraphrased_answer"] for row in rows] + [a for group in perturbed for a in group]
    nll = answer_nll(
        model, tokenizer, flat_q, flat_a, batch_size=batch_size, max_length=max_length, template=template
    )
    return truth_ratios_from_nll(nll[: len(rows)], list(nll[len(rows) :].split([len(g) for g in perturbed])))


def truth_ratio_statistic(ratios: torch.Tensor | Sequence[float], split_kind: str) -> float:
    """TOFU's summary of the truth ratios of a split.

    * ``split_kind="forget"``: ``mean(min(R, 1/R))`` - 1 when the model cannot tell the right answer
      from the wrong ones (the retain model's behaviour on unseen facts), towards 0 when it strongly
      prefers either;
    * ``split_kind="retain"`` or ``"utility"`` (retain, real-authors, world-facts, general splits):
      ``mean(max(0, 1 - R))`` - towards 1 when the model prefers the right answer.
    """
    values = torch.as_tensor(ratios, dtype=torch.float64).flatten()
    if values.numel() == 0:
        raise UserError("ratios: empty")
    if split_kind == FORGET_KIND:
        return float(torch.minimum(values, 1.0 / values).mean())
    if split_kind in _UTILITY_ALIASES:
        return float((1.0 - values).clamp(min=0.0).mean())
    raise UserError(f"split_kind: expected 'forget', 'retain' or 'utility', got {split_kind!r}")


# ----------------------------------------------------------------------------------------- generation
_SCORER = None  # rouge_score.rouge_scorer.RougeScorer, made on first use (its import takes ~1.5 s)


def rouge_l_recall(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L recall of each prediction: ``LCS(pred, ref) / len(ref)`` over ``rouge_score`` tokens
    (lower-cased alphanumeric words, Porter-stemmed: ``RougeScorer(["rougeL"], use_stemmer=True)``)."""
    global _SCORER
    predictions = _str_list(predictions, "predictions")
    references = _str_list(references, "references")
    if len(predictions) != len(references):
        raise UserError(f"predictions/references: lengths differ ({len(predictions)} vs {len(references)})")
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [
        float(_SCORER.score(ref, pred)["rougeL"].recall)
        for pred, ref in zip(predictions, references, strict=True)
    ]


@torch.no_grad()
def greedy_answers(
    model,
    tokenizer,
    questions: Sequence[str],
    *,
    max_new_tokens: int = 200,
    batch_size: int = 16,
    template: str | PromptFormat | None = None,
) -> list[str]:
    """Greedy (argmax) continuation of each question's prompt in format ``template``.

    Prompts are encoded as in training (``PromptFormat.prompt_ids``: BOS, prompt and answer tag, or
    the chat template's generation prompt), left-padded into batches (in length
    order, to limit padding), and ``model.generate(do_sample=False)`` continues them for at most
    ``max_new_tokens`` tokens. Only the new tokens are decoded, cut at the first EOS, special tokens
    skipped, whitespace stripped. The model's train/eval modes are restored.
    """
    questions = _str_list(questions, "questions")
    check_number("batch_size", batch_size, low=1, integer=True)
    check_number("max_new_tokens", max_new_tokens, low=1, integer=True)
    if not questions:
        return []
    pad, eos = pad_id_of(tokenizer), tokenizer.eos_token_id
    fmt = get_prompt_format(template)
    prompts = [fmt.prompt_ids(tokenizer, q) for q in questions]
    longest = max(len(p) for p in prompts)
    check_sequence_length(
        model,
        longest + max_new_tokens,
        what=f"generation: prompt of {longest} tokens + max_new_tokens={max_new_tokens}",
        option="max_new_tokens (CLI: --max-new-tokens)",
        used=longest,
    )
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    device = _input_device(model)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in index)
            input_ids = torch.full((len(index), width), pad, dtype=torch.long)
            attention = torch.zeros((len(index), width), dtype=torch.long)
            for row, i in enumerate(index):
                ids = prompts[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention[row, width - len(ids) :] = 1
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
                eos_token_id=eos,
            )
            for row, i in enumerate(index):
                new = output[row, width:].tolist()
                if eos is not None and eos in new:
                    new = new[: new.index(eos)]
                answers[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
    return answers


# ------------------------------------------------------------------------------------------ summaries
def _sample(values, name: str) -> np.ndarray:
    array = np.asarray(
        values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) else values,
        dtype=np.float64,
    ).ravel()
    if array.size == 0:
        raise UserError(f"{name}: empty sample")
    if np.isnan(array).any():
        raise UserError(f"{name}: contains NaN")
    return array


def forget_quality(truth_ratios, reference_truth_ratios) -> float:
    """``p``-value of ``scipy.stats.ks_2samp(truth_ratios, reference_truth_ratios)`` (two-sided).

    The KS statistic ``sup_x |F_1(x) - F_2(x)|`` depends only on the ranks of the pooled sample, so it
    is the same for R and for TOFU's 1/R. High p-value: the unlearned model's forget-split truth
    ratios look like those of the retain model (1.0 for identical samples).
    """
    a = _sample(truth_ratios, "truth_ratios")
    b = _sample(reference_truth_ratios, "reference_truth_ratios")
    from scipy import stats

    return float(stats.ks_2samp(a, b).pvalue)


def model_utility(values: Sequence[float] | Mapping[str, float]) -> float:
    """Harmonic mean ``n / sum_i (1 / v_i)`` of the utility metrics (``scipy.stats.hmean``); 0 when
    any value is 0. In TOFU the values are probability, ROUGE-L recall and truth-ratio statistic on
    each utility split. ``values`` may be a mapping (its values are used)."""
    raw = list(values.values()) if isinstance(values, Mapping) else list(values)
    if not raw:
        raise UserError("values: empty")
    floats = [float(v) for v in raw]
    if any(math.isnan(v) or v < 0 for v in floats):
        raise UserError(f"values: must all be >= 0 (and not NaN), got {floats}")
    if any(v == 0 for v in floats):
        return 0.0
    from scipy import stats

    return float(stats.hmean(floats))
