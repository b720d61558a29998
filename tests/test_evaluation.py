"""Evaluation metrics against hand computations, and evaluate()/report end to end on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_model, tiny_tokenizer
from scipy import stats

from wagle.data import encode_qa, generate_rows
from wagle.evaluation import (
    EvaluationResult,
    answer_nll,
    evaluate,
    forget_quality,
    format_table,
    greedy_answers,
    model_utility,
    plot_tradeoff,
    rouge_l_recall,
    truth_ratio,
    truth_ratio_statistic,
    write_json,
)
from wagle.evaluation import metrics as metrics_module


def test_rouge_l_recall_by_hand():
    # reference "the cat sat on the mat" (6 tokens); LCS with "the cat on a mat" = the,cat,on,mat = 4
    assert rouge_l_recall(["the cat on a mat"], ["the cat sat on the mat"]) == [pytest.approx(4 / 6)]
    assert rouge_l_recall(["nothing in common"], ["the cat"]) == [0.0]
    assert rouge_l_recall(["the cat"], ["the cat"]) == [1.0]
    with pytest.raises(ValueError, match="lengths"):
        rouge_l_recall(["a"], [])


def test_truth_ratio_from_known_nlls(monkeypatch):
    rows = [{"question": "q", "paraphrased_answer": "para", "perturbed_answer": ["x", "y"]}]
    table = {"para": 1.0, "x": 2.0, "y": 4.0}

    def fake_nll(model, tokenizer, questions, answers, **kw):
        return torch.tensor([table[a] for a in answers])

    monkeypatch.setattr(metrics_module, "answer_nll", fake_nll)
    ratio = truth_ratio(None, None, rows)
    # R = exp(NLL(para) - mean NLL(perturbed)) = exp(1 - 3)
    assert float(ratio[0]) == pytest.approx(math.exp(-2.0))
    assert truth_ratio_statistic(ratio, "forget") == pytest.approx(math.exp(-2.0))
    assert truth_ratio_statistic(torch.tensor([0.25, 2.0]), "forget") == pytest.approx((0.25 + 0.5) / 2)
    assert truth_ratio_statistic(torch.tensor([0.25, 2.0]), "utility") == pytest.approx((0.75 + 0.0) / 2)


def test_forget_quality_is_the_ks_p_value():
    a, b = [0.1, 0.5, 0.9, 1.3, 2.0], [0.2, 0.4, 0.8, 3.0, 4.0, 5.0]
    assert forget_quality(a, b) == pytest.approx(stats.ks_2samp(a, b).pvalue)
    assert forget_quality(a, a) == 1.0
    assert forget_quality([0.0] * 20, [1.0] * 20) < 1e-6


def test_model_utility_is_the_harmonic_mean():
    assert model_utility([0.5, 0.25, 1.0]) == pytest.approx(3 / (2 + 4 + 1))
    assert model_utility([0.5, 0.0]) == 0.0
    with pytest.raises(ValueError):
        model_utility([])


def test_answer_nll_against_manual_log_softmax_and_padding_invariance():
    tok, model = tiny_tokenizer(), tiny_model()
    rows = generate_rows(num_authors=10)["forget10"][:3]
    questions, answers = [r["question"] for r in rows], [r["answer"] for r in rows]
    batched = answer_nll(model, tok, questions, answers, batch_size=3)
    for i in range(3):
        single = answer_nll(model, tok, questions[i : i + 1], answers[i : i + 1], batch_size=1)
        assert torch.allclose(batched[i], single[0], atol=1e-5)
        encoded = encode_qa(tok, questions[i], answers[i])
        ids = torch.tensor([encoded["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        terms = [-logp[t - 1, y] for t, y in enumerate(encoded["labels"]) if y != -100]
        assert torch.allclose(batched[i], torch.stack(terms).mean(), atol=1e-5)


def test_greedy_batched_equals_unbatched():
    tok, model = tiny_tokenizer(), tiny_model(seed=2)
    questions = [r["question"] for r in generate_rows(num_authors=10)["forget10"][:4]]
    batched = greedy_answers(model, tok, questions, max_new_tokens=6, batch_size=4)
    single = [greedy_answers(model, tok, [q], max_new_tokens=6, batch_size=1)[0] for q in questions]
    assert batched == single


def test_evaluate_reference_against_itself_and_reports(tmp_path):
    tok, model = tiny_tokenizer(), tiny_model()
    rows = generate_rows(num_authors=20)
    splits = {"forget": rows["forget10"][:6], "retain": rows["retain90"][:6], "general": rows["general"][:6]}
    kw = {"batch_size": 4, "max_new_tokens": 4, "progress": False}
    own = evaluate(model, tok, splits, **kw)
    assert own.forget_quality is None  # absent without a reference, not faked
    against_model = evaluate(model, tok, splits, reference=model, **kw)
    assert against_model.forget_quality == 1.0
    against_result = evaluate(model, tok, splits, reference=own, **kw)
    assert against_result.forget_quality == 1.0
    assert 0.0 <= against_result.model_utility <= 1.0
    restored = EvaluationResult.from_dict(against_result.to_dict())
    assert restored.splits["forget"].truth_ratios == against_result.splits["forget"].truth_ratios
    table = format_table({"model": against_result, "other": own})
    assert "forget quality" in table and "model" in table.splitlines()[2]
    write_json(str(tmp_path / "r.json"), against_result.to_dict())
    plot_tradeoff({"model": against_result}, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="forget split"):
        evaluate(model, tok, {"retain": splits["retain"]}, utility_splits=("retain",), **kw)
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, tok, {**splits, "forget": []}, **kw)
