"""TOFU-style metrics (Maini et al., 2024) as pure functions.

* answer NLL: mean over answer tokens of -log p(token | question, previous answer tokens);
* answer probability P~ = exp(-answer NLL) (length-normalised probability);
* truth ratio R = P~(perturbed answers, averaged in log space) / P~(paraphrased answer)
  = exp(NLL(paraphrased) - mean_j NLL(perturbed_j));
* ROUGE-L recall of the greedy answer against the reference answer;
* forget quality: p-value of the two-sample Kolmogorov-Smirnov test between the forget-split truth
  ratios of the evaluated model and of the retain model;
* model utility: harmonic mean of the utility metrics (probability, ROUGE-L, truth-ratio statistic
  on every utility split).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from rouge_score import rouge_scorer
from scipy import stats

from wagle.data.format import encode_qa, format_question, pad_batch

FORGET_KIND, UTILITY_KIND = "forget", "utility"


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer: has neither a pad nor an eos token")
    return pad


@torch.no_grad()
def answer_nll(
    model,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 256,
) -> torch.Tensor:
    """Per-example mean NLL of the answer tokens given the question (fp32, on the CPU)."""
    if len(questions) != len(answers):
        raise ValueError(f"questions/answers: lengths differ ({len(questions)} vs {len(answers)})")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    out = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(questions), batch_size):
            encoded = [
                encode_qa(tokenizer, q, a, max_length)
                for q, a in zip(
                    questions[start : start + batch_size], answers[start : start + batch_size], strict=True
                )
            ]
            batch = pad_batch(encoded, _pad_id(tokenizer))
            logits = (
                model(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                )
                .logits[:, :-1]
                .float()
            )
            targets = batch["labels"][:, 1:].to(device)
            valid = targets != -100
            logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            nll = -(logp * valid).sum(1) / valid.sum(1).clamp(min=1)
            out.append(nll.cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def answer_probability(model, tokenizer, questions, answers, **kw) -> torch.Tensor:
    """P~ = exp(-mean answer-token NLL), per example."""
    return torch.exp(-answer_nll(model, tokenizer, questions, answers, **kw))


def truth_ratio(model, tokenizer, dataset, *, batch_size: int = 16, max_length: int = 256) -> torch.Tensor:
    """R_i = exp(NLL(paraphrased_i) - mean_j NLL(perturbed_ij)), per example."""
    rows = dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)
    for column in ("question", "paraphrased_answer", "perturbed_answer"):
        if rows and column not in rows[0]:
            raise ValueError(f"dataset: truth ratio needs a {column!r} column")
    questions = [r["question"] for r in rows]
    nll_para = answer_nll(
        model,
        tokenizer,
        questions,
        [r["paraphrased_answer"] for r in rows],
        batch_size=batch_size,
        max_length=max_length,
    )
    flat_q, flat_a, owner = [], [], []
    for i, row in enumerate(rows):
        if not row["perturbed_answer"]:
            raise ValueError(f"dataset: row {i} has no perturbed answers")
        for answer in row["perturbed_answer"]:
            flat_q.append(row["question"])
            flat_a.append(answer)
            owner.append(i)
    nll_pert = answer_nll(model, tokenizer, flat_q, flat_a, batch_size=batch_size, max_length=max_length)
    owner_t = torch.tensor(owner, dtype=torch.long)
    sums = torch.zeros(len(rows)).index_add_(0, owner_t, nll_pert)
    counts = torch.zeros(len(rows)).index_add_(0, owner_t, torch.ones_like(nll_pert))
    return torch.exp(nll_para - sums / counts)


def truth_ratio_statistic(ratios: torch.Tensor, kind: str) -> float:
    """TOFU's summary: ``forget`` -> mean(min(R, 1/R)); ``utility`` -> mean(max(0, 1 - R))."""
    ratios = torch.as_tensor(ratios, dtype=torch.float64)
    if ratios.numel() == 0:
        raise ValueError("ratios: empty")
    if kind == FORGET_KIND:
        return float(torch.minimum(ratios, 1.0 / ratios).mean())
    if kind == UTILITY_KIND:
        return float((1.0 - ratios).clamp(min=0.0).mean())
    raise ValueError(f"kind: expected 'forget' or 'utility', got {kind!r}")


_SCORER = None


def rouge_l_recall(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L recall (LCS / reference length, stemmed) of each prediction, via ``rouge_score``."""
    global _SCORER
    if len(predictions) != len(references):
        raise ValueError(f"predictions/references: lengths differ ({len(predictions)} vs {len(references)})")
    if _SCORER is None:
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [
        _SCORER.score(ref, pred)["rougeL"].recall for pred, ref in zip(predictions, references, strict=True)
    ]


@torch.no_grad()
def greedy_answers(
    model, tokenizer, questions: Sequence[str], *, max_new_tokens: int = 48, batch_size: int = 16
) -> list[str]:
    """Greedy continuations of each question prompt (left-padded batches; only new tokens decoded)."""
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    answers = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(questions), batch_size):
            prompts = []
            for q in questions[start : start + batch_size]:
                ids = tokenizer(format_question(q), add_special_tokens=False)["input_ids"]
                prompts.append(([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids)
            width = max(len(p) for p in prompts)
            input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
            attention = torch.zeros((len(prompts), width), dtype=torch.long)
            for row, ids in enumerate(prompts):
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention[row, width - len(ids) :] = 1
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
            for row in output[:, width:].tolist():
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id)]
                answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return answers


def forget_quality(truth_ratios, reference_truth_ratios) -> float:
    """p-value of scipy's two-sample KS test between the two truth-ratio samples."""
    a = np.asarray(truth_ratios, dtype=np.float64)
    b = np.asarray(reference_truth_ratios, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("truth_ratios/reference_truth_ratios: empty sample")
    return float(stats.ks_2samp(a, b).pvalue)


def model_utility(values: Sequence[float]) -> float:
    """Harmonic mean of the utility metrics (0 when any of them is 0)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("values: empty")
    if any(v < 0 for v in values):
        raise ValueError(f"values: must be >= 0, got {values}")
    if any(v == 0 for v in values):
        return 0.0
    return float(stats.hmean(values))
