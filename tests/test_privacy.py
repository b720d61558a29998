"""Memorisation and membership-inference metrics against hand computations; the holdout split."""

from __future__ import annotations

import itertools
import json
import math
import pathlib
import zlib

import numpy as np
import pytest
import torch
from helpers import tiny_model, tiny_tokenizer

from wagle.data import (
    HOLDOUT_OF,
    HOLDOUT_SPLITS,
    SPLITS,
    benchmark_split,
    encode_qa,
    generate_benchmark,
    generate_holdout,
    generate_rows,
    write_benchmark,
)
from wagle.evaluation import (
    EvaluationResult,
    PrivacyMetrics,
    evaluate,
    exact_memorization_score,
    extraction_strength_score,
    format_privacy_table,
    gradnorm_scores,
    mia_auc,
    min_k_plus_plus_score,
    min_k_score,
    plot_privacy,
    privacy_metrics,
    privleak,
    roc_curve,
    token_statistics,
    write_json,
    zlib_score,
)
from wagle.evaluation.privacy import TokenStats, loss_score


def brute_force_auc(forget, holdout):
    """P(holdout score > forget score) + P(tie) / 2 by counting every pair."""
    wins = sum((h > f) + 0.5 * (h == f) for f, h in itertools.product(forget, holdout))
    return wins / (len(forget) * len(holdout))


def test_mia_auc_is_the_pair_counting_probability():
    rng = np.random.default_rng(0)
    for _ in range(20):
        forget = rng.integers(0, 6, size=rng.integers(1, 9)).astype(float)  # many ties
        holdout = rng.integers(0, 6, size=rng.integers(1, 9)).astype(float)
        assert mia_auc(forget, holdout) == pytest.approx(brute_force_auc(forget, holdout))
    assert mia_auc([0.1, 0.2], [0.3, 0.4]) == 1.0  # holdout all higher loss: forget set looks seen
    assert mia_auc([0.3, 0.4], [0.1, 0.2]) == 0.0
    assert mia_auc([1.0, 1.0], [1.0]) == 0.5
    with pytest.raises(ValueError, match="mia_auc"):
        mia_auc([], [1.0])
    fpr, tpr = roc_curve([0.1, 0.5, 0.3], [0.4, 0.2, 0.6, 0.6])
    assert np.trapezoid(tpr, fpr) == pytest.approx(mia_auc([0.1, 0.5, 0.3], [0.4, 0.2, 0.6, 0.6]))


def test_privleak_formula():
    assert privleak(0.5, 0.5) == 0.0
    assert privleak(0.9, 0.5) == pytest.approx(((1 - 0.9) - 0.5) / (0.5 + 1e-10) * 100)
    assert privleak(0.3, 0.6) == pytest.approx((0.7 - 0.4) / (0.4 + 1e-10) * 100)


def stats_of(logprobs, hits, mu=None, var=None, text="abc"):
    n = len(logprobs)
    return TokenStats(
        logprobs=torch.tensor(logprobs, dtype=torch.float64),
        hits=torch.tensor(hits, dtype=torch.bool),
        mu=torch.tensor(mu if mu is not None else [0.0] * n, dtype=torch.float64),
        var=torch.tensor(var if var is not None else [1.0] * n, dtype=torch.float64),
        text=text,
    )


def test_token_scores_by_hand():
    # 6 answer tokens + EOS (last); the token-level scores drop the EOS
    lp = [-1.0, -3.0, -0.5, -2.0, -4.0, -0.1, -9.0]
    s = stats_of(lp, [1, 0, 1, 1, 1, 1, 0], text="Anna was born in Oslo.")
    assert loss_score(s) == pytest.approx(-sum(lp) / 7)  # the loss keeps the EOS
    assert zlib_score(s) == pytest.approx((-sum(lp) / 7) / len(zlib.compress(b"Anna was born in Oslo.")))
    assert min_k_score(s, 0.4) == pytest.approx((4.0 + 3.0) / 2)  # int(0.4 * 6) = 2 lowest, EOS dropped
    assert min_k_score(s, 0.1) == pytest.approx(4.0)  # max(1, int(0.6)) = 1
    assert min_k_score(stats_of([-2.0], [1]), 0.4) == 0.0  # only the EOS: OpenUnlearning's 0
    assert exact_memorization_score(s) == pytest.approx(5 / 6)
    assert extraction_strength_score(s) == pytest.approx(1 - 2 / 6)  # from token 2 on all predicted
    assert extraction_strength_score(stats_of([-1.0] * 4, [1, 1, 1, 0])) == 1.0
    assert extraction_strength_score(stats_of([-1.0] * 4, [1, 1, 0, 1])) == pytest.approx(
        1 - 2 / 3
    )  # none: n-1
    assert extraction_strength_score(stats_of([-1.0] * 3, [1, 0, 1])) == pytest.approx(1 - 1 / 2)


def test_min_k_plus_plus_from_explicit_vocabulary_moments():
    """Three positions over a 4-word vocabulary: mu and sigma^2 written out by hand."""
    probs = torch.tensor(
        [[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.5, 0.3, 0.15, 0.05]], dtype=torch.float64
    )
    targets = [0, 2, 1]
    eos = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    rows = torch.cat([probs, eos[None]])
    mu, var, lp = [], [], []
    for row, y in zip(rows.tolist(), [*targets, 3], strict=True):
        m = sum(p * math.log(p) for p in row)
        mu.append(m)
        var.append(sum(p * math.log(p) ** 2 for p in row) - m * m)
        lp.append(math.log(row[y]))
    z = [(lp[t] - mu[t]) / math.sqrt(max(var[t], 1e-6)) for t in range(3)]
    s = stats_of(lp, [1, 1, 1, 1], mu, var)
    assert min_k_plus_plus_score(s, 0.4) == pytest.approx(-min(z))  # int(1.2) = 1 lowest
    assert min_k_plus_plus_score(s, 1.0) == pytest.approx(-sum(z) / 3)
    assert var[1] < 1e-12  # a uniform distribution: sigma^2 = 0, floored at 1e-6
    assert min_k_plus_plus_score(stats_of(lp[1:2] + [0.0], [1, 1], mu[1:2] + [0.0], var[1:2] + [1.0])) == (
        pytest.approx(-(lp[1] - mu[1]) / 1e-3)
    )


def test_token_statistics_against_a_manual_forward_pass():
    tok, model = tiny_tokenizer(), tiny_model()
    rows = generate_rows(num_authors=20)["forget10"][:3]
    q, a = [r["question"] for r in rows], [r["answer"] for r in rows]
    stats = token_statistics(model, tok, q, a, batch_size=2, template="reference")
    for question, answer, got in zip(q, a, stats, strict=True):
        e = encode_qa(tok, question, answer, template="reference")
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1].double()
        labels = torch.tensor(e["labels"][1:])
        keep = labels != -100
        logp = torch.log_softmax(logits[keep], -1)
        y = labels[keep]
        p = logp.exp()
        assert got.logprobs.tolist() == pytest.approx(logp[torch.arange(len(y)), y].tolist(), abs=1e-5)
        assert got.hits.tolist() == (logp.argmax(-1) == y).tolist()
        mu = (p * logp).sum(-1)
        assert got.mu.tolist() == pytest.approx(mu.tolist(), abs=1e-5)
        assert got.var.tolist() == pytest.approx(((p * logp**2).sum(-1) - mu**2).tolist(), abs=1e-5)
        assert got.text == tok.decode(y.tolist(), skip_special_tokens=True)
        assert got.text.startswith("### Answer: ")  # the reference format's tag carries a loss


def test_gradnorm_against_a_manual_backward():
    tok, model = tiny_tokenizer(), tiny_model()
    row = generate_rows(num_authors=20)["forget10"][0]
    e = encode_qa(tok, row["question"], row["answer"])
    logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1]
    labels = torch.tensor(e["labels"][1:])
    positions = (labels != -100).nonzero().squeeze(1)[:-1]  # EOS dropped
    loss = -torch.log_softmax(logits[positions], -1)[torch.arange(len(positions)), labels[positions]].mean()
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    expected = float(torch.stack([g.double().norm() for g in grads if g is not None]).mean())
    model.zero_grad()
    first = next(model.parameters())
    first.grad = torch.full_like(first, 7.0)  # existing gradients survive
    (score,) = gradnorm_scores(model, tok, [row["question"]], [row["answer"]])
    assert score == pytest.approx(expected, rel=1e-4)
    assert torch.all(first.grad == 7.0)


def test_privacy_metrics_on_a_model_and_against_a_reference():
    tok = tiny_tokenizer()
    target, retain = tiny_model(seed=0), tiny_model(seed=1)
    forget = generate_rows(num_authors=20)["forget10"][:6]
    holdout = generate_holdout(num_authors=20)["holdout10"][:5]
    kw = {"batch_size": 4}
    result = privacy_metrics(target, tok, forget, holdout, reference=retain, gradnorm=True, **kw)
    assert set(result.auc) == {"loss", "zlib", "min_k", "min_k++", "reference", "gradnorm"}
    questions = [r["question"] for r in forget + holdout]
    answers = [r["answer"] for r in forget + holdout]
    stats = token_statistics(target, tok, questions, answers)
    ref_stats = token_statistics(retain, tok, questions, answers)
    loss = [loss_score(s) for s in stats]
    min_k = [min_k_score(s, 0.4) for s in stats]
    assert result.forget_scores["loss"] == pytest.approx(loss[:6]) and result.holdout_scores[
        "loss"
    ] == pytest.approx(loss[6:])
    for name, values in result.forget_scores.items():
        assert result.auc[name] == pytest.approx(brute_force_auc(values, result.holdout_scores[name]))
    ref = [a - loss_score(b) for a, b in zip(loss, ref_stats, strict=True)]
    assert result.forget_scores["reference"] + result.holdout_scores["reference"] == pytest.approx(ref)
    retain_auc = brute_force_auc(
        [min_k_score(s) for s in ref_stats[:6]], [min_k_score(s) for s in ref_stats[6:]]
    )
    assert result.retain_min_k_auc == pytest.approx(retain_auc)
    assert result.privleak == pytest.approx(privleak(brute_force_auc(min_k[:6], min_k[6:]), retain_auc))
    assert result.exact_memorization == pytest.approx(
        np.mean([s.hits[:-1].double().mean() for s in stats[:6]])
    )
    assert result.extraction_strength == pytest.approx(
        np.mean([extraction_strength_score(s) for s in stats[:6]])
    )
    # the retain model's stored metrics give the same reference attack and privleak as the model
    own_retain = privacy_metrics(retain, tok, forget, holdout, **kw)
    assert own_retain.privleak is None and "reference" not in own_retain.auc
    via_result = privacy_metrics(target, tok, forget, holdout, reference=own_retain, **kw)
    assert via_result.auc["reference"] == pytest.approx(result.auc["reference"])
    assert via_result.privleak == pytest.approx(result.privleak)
    with pytest.raises(ValueError, match="reference"):
        privacy_metrics(target, tok, forget[:3], holdout, reference=own_retain, **kw)
    with pytest.raises(ValueError, match="k: must be"):
        privacy_metrics(target, tok, forget, holdout, k=0.0)
    assert PrivacyMetrics.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_evaluate_with_holdout_reports_privacy(tmp_path):
    tok = tiny_tokenizer()
    target, retain = tiny_model(seed=0), tiny_model(seed=1)
    rows = generate_rows(num_authors=20)
    splits = {"forget": rows["forget10"][:4], "retain": rows["retain90"][:4]}
    holdout = generate_holdout(num_authors=20)["holdout10"]
    kw = {
        "batch_size": 4,
        "max_new_tokens": 2,
        "progress": False,
        "utility_splits": ("retain",),
        "holdout": holdout,
    }
    retain_result = evaluate(retain, tok, splits, max_examples=4, **kw)
    assert retain_result.privacy is not None and retain_result.privacy.privleak is None
    assert len(retain_result.privacy.holdout_scores["loss"]) == 4  # max_examples applies to the holdout too
    result = evaluate(target, tok, splits, reference=retain_result, max_examples=4, **kw)
    direct = evaluate(target, tok, splits, reference=retain, max_examples=4, **kw)
    assert result.privacy.privleak == pytest.approx(direct.privacy.privleak)
    assert result.settings == {"prompt_format": "wagle", "max_new_tokens": 2, "max_length": 256}
    without = evaluate(target, tok, splits, **{**kw, "holdout": None})
    assert without.privacy is None
    assert (
        without.splits["forget"].probabilities == result.splits["forget"].probabilities
    )  # TOFU part unchanged
    restored = EvaluationResult.from_dict(json.loads(json.dumps(result.to_dict(), allow_nan=False)))
    assert restored == result
    table = format_privacy_table({"target": result, "retain": retain_result, "no holdout": without})
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["run", "ES", "EM"] and "privleak" in lines[0] and "AUC ref" in lines[0]
    assert lines[2].startswith("target") and lines[3].startswith("retain") and len(lines) == 4
    assert format_privacy_table({"x": without}) == ""
    write_json(tmp_path / "r.json", {"target": result})
    plot_privacy({"target": result, "retain": retain_result}, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png", "r.json"]
    with pytest.raises(ValueError, match="privacy"):
        plot_privacy({"x": without}, tmp_path / "q.png")


def test_holdout_split_is_new_authors_and_leaves_the_benchmark_unchanged(tmp_path):
    rows, holdout = generate_rows(), generate_holdout()
    assert list(holdout) == list(HOLDOUT_SPLITS) and HOLDOUT_OF["forget10"] == "holdout10"
    for split, forget in (("holdout01", "forget01"), ("holdout05", "forget05"), ("holdout10", "forget10")):
        assert len(holdout[split]) == len(rows[forget])
    assert holdout["holdout10"][: len(holdout["holdout05"])] == holdout["holdout05"]  # nested
    authors = {r["author"] for r in rows["full"]}
    held = {r["author"] for r in holdout["holdout10"]}
    assert len(held) == 10 and not held & authors
    books = {r["answer"] for r in rows["full"] if "wrote the novel" in r["answer"]}
    titles = {b.split("wrote the novel ")[1] for b in books}
    assert not any(r["answer"].split("wrote the novel ")[-1] in titles for r in holdout["holdout10"][3::5])
    assert not {r["question"] for r in holdout["holdout10"]} & {r["question"] for r in rows["full"]}
    assert generate_holdout(seed=1) != holdout and generate_holdout() == holdout
    plain = write_benchmark(tmp_path / "a")
    both = write_benchmark(tmp_path / "b", holdout=True)
    assert set(plain) == set(SPLITS) and set(both) == set(SPLITS) | set(HOLDOUT_SPLITS)
    for name in SPLITS:
        assert pathlib.Path(plain[name]).read_bytes() == pathlib.Path(both[name]).read_bytes()
    assert list(generate_benchmark(num_authors=20, holdout=True)) == [*SPLITS, *HOLDOUT_SPLITS]
    assert benchmark_split("holdout01", num_authors=20).to_list() == generate_holdout(20)["holdout01"]
    with pytest.raises(ValueError, match="num_authors"):
        generate_holdout(num_authors=900)
