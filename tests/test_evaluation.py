"""Evaluation metrics against hand computations; evaluate() and the reports on a tiny random Llama.

Self-contained: the word-level tokenizer and the tiny Llama are built here (only ``wagle.data.format``
is used from the rest of the package).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from scipy import stats
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from wagle.data.format import IGNORE_INDEX, encode_qa, format_answer, format_question
from wagle.evaluation import (
    EvaluationResult,
    answer_nll,
    answer_probability,
    evaluate,
    forget_quality,
    format_table,
    greedy_answers,
    model_utility,
    plot_tradeoff,
    rouge_l_recall,
    truth_ratio,
    truth_ratio_statistic,
    truth_ratios_from_nll,
    write_json,
)
from wagle.evaluation import metrics as metrics_module

QA = [
    ("Who wrote the red book?", "Anna Berg wrote the red book.", "The red book is by Anna Berg."),
    ("Where was Anna Berg born?", "She was born in Oslo.", "Anna Berg was born in Oslo."),
    ("What genre does Tom Hale write?", "Tom Hale writes crime novels.", "He writes crime novels."),
    ("When did the blue house appear?", "It appeared in 1999.", "The blue house came out in 1999."),
    ("Which award did Tom Hale win?", "He won the gold pen award.", "Tom Hale won the gold pen award."),
    ("Who is the father of Anna Berg?", "Her father is a baker.", "Anna Berg has a baker father."),
]
PERTURBED = [
    ["Tom Hale wrote the red book.", "The red book is by a baker."],
    ["She was born in Rome.", "Anna Berg was born in Paris.", "She was born in 1999."],
    ["Tom Hale writes poems."],
    ["It appeared in 1950.", "The blue house came out in Oslo."],
    ["He won the crime award.", "Tom Hale won no award."],
    ["Her father is a writer.", "Anna Berg has a crime father."],
]


def qa_rows(start: int = 0, stop: int = len(QA)) -> list[dict]:
    return [
        {"question": q, "answer": a, "paraphrased_answer": p, "perturbed_answer": PERTURBED[i]}
        for i, (q, a, p) in enumerate(QA)
    ][start:stop]


_TOKENIZER = None


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: one thread is faster, and immune to OpenMP spin-waiting on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the QA texts, with <s>, </s>, <pad>, <unk>."""
    global _TOKENIZER
    if _TOKENIZER is None:
        texts = []
        for row in qa_rows():
            texts.append(format_question(row["question"]) + format_answer(row["answer"]))
            texts += [row["paraphrased_answer"], *row["perturbed_answer"]]
        backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        backend.train_from_iterator(
            texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
        )
        _TOKENIZER = PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
        )
    return _TOKENIZER


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger logits than the default init, so greedy choices are not near-ties
        model.lm_head.weight.mul_(8.0)
    return model


# ------------------------------------------------------------------------------------------- ROUGE-L
def test_rouge_l_recall_by_hand():
    # reference "the cat sat on the mat" (6 tokens); LCS with "the cat on a mat" = the,cat,on,mat -> 4/6
    assert rouge_l_recall(["the cat on a mat"], ["the cat sat on the mat"]) == [pytest.approx(4 / 6)]
    # LCS is order-sensitive: "mat the cat" vs "the cat sat" -> the,cat = 2 of 3 reference tokens
    assert rouge_l_recall(["mat the cat"], ["the cat sat"]) == [pytest.approx(2 / 3)]
    # recall ignores extra predicted words; stemming maps "writes"/"writing" to "write"
    assert rouge_l_recall(["Anna writing lots of novels"], ["Anna writes novels"]) == [pytest.approx(1.0)]
    assert rouge_l_recall(["nothing in common", ""], ["the cat", "the cat"]) == [0.0, 0.0]
    assert rouge_l_recall([], []) == []
    with pytest.raises(ValueError, match="predictions/references"):
        rouge_l_recall(["a"], [])
    with pytest.raises(ValueError, match="predictions"):
        rouge_l_recall("a cat", "a cat")


# -------------------------------------------------------------------------------------- truth ratio
def test_truth_ratio_from_known_nlls(monkeypatch):
    rows = [
        {"question": "q1", "paraphrased_answer": "para", "perturbed_answer": ["x", "y"]},
        {"question": "q2", "paraphrased_answer": "para2", "perturbed_answer": ["z"]},
    ]
    table = {"para": 1.0, "x": 2.0, "y": 4.0, "para2": 3.0, "z": 1.0}
    seen = {}

    def fake_nll(model, tokenizer, questions, answers, **kw):
        seen["pairs"] = list(zip(questions, answers, strict=True))
        return torch.tensor([table[a] for a in answers])

    monkeypatch.setattr(metrics_module, "answer_nll", fake_nll)
    ratio = truth_ratio(None, None, rows)
    # R = P~(perturbed) / P~(para) = exp(NLL(para) - mean NLL(perturbed)): exp(1 - 3), exp(3 - 1)
    assert ratio.dtype == torch.float64
    assert ratio.tolist() == pytest.approx([math.exp(-2.0), math.exp(2.0)])
    assert ("q1", "y") in seen["pairs"] and ("q2", "z") in seen["pairs"]  # each answer with its question
    # log-space averaging = geometric mean of the perturbed probabilities
    geo = math.sqrt(math.exp(-2.0) * math.exp(-4.0)) / math.exp(-1.0)
    assert float(ratio[0]) == pytest.approx(geo)
    assert truth_ratios_from_nll([1.0], [[2.0, 4.0]]).tolist() == pytest.approx([math.exp(-2.0)])
    with pytest.raises(ValueError, match="paraphrased_answer"):
        truth_ratio(None, None, [{"question": "q", "perturbed_answer": ["x"]}])
    with pytest.raises(ValueError, match="perturbed_answer"):
        truth_ratio(None, None, [{"question": "q", "paraphrased_answer": "p", "perturbed_answer": []}])
    with pytest.raises(ValueError, match="empty"):
        truth_ratio(None, None, [])


def test_truth_ratio_statistic_by_hand():
    r = torch.tensor([0.25, 2.0, 1.0])
    assert truth_ratio_statistic(r, "forget") == pytest.approx((0.25 + 0.5 + 1.0) / 3)  # min(R, 1/R)
    assert truth_ratio_statistic(r, "retain") == pytest.approx((0.75 + 0.0 + 0.0) / 3)  # max(0, 1 - R)
    assert truth_ratio_statistic([0.5], "utility") == pytest.approx(0.5)
    assert truth_ratio_statistic([0.0, math.inf], "forget") == 0.0
    with pytest.raises(ValueError, match="split_kind"):
        truth_ratio_statistic(r, "general-ish")
    with pytest.raises(ValueError, match="ratios"):
        truth_ratio_statistic([], "forget")


# ------------------------------------------------------------------------- forget quality, utility
def test_forget_quality_is_the_ks_p_value():
    a, b = [0.1, 0.5, 0.9, 1.3, 2.0], [0.2, 0.4, 0.8, 3.0, 4.0, 5.0]
    assert forget_quality(a, b) == pytest.approx(stats.ks_2samp(a, b).pvalue)
    assert forget_quality(torch.tensor(a), b) == pytest.approx(stats.ks_2samp(a, b).pvalue)
    assert forget_quality(a, a) == 1.0
    # disjoint samples of 20: exact two-sided p = 2 / C(40, 20)
    assert forget_quality([0.0] * 20, [1.0] * 20) == pytest.approx(2 / math.comb(40, 20))
    # invariant under R -> 1/R (TOFU tests 1/R)
    assert forget_quality(a, b) == pytest.approx(forget_quality([1 / x for x in a], [1 / x for x in b]))
    with pytest.raises(ValueError, match="reference_truth_ratios"):
        forget_quality(a, [])
    with pytest.raises(ValueError, match="NaN"):
        forget_quality([math.nan], a)


def test_model_utility_is_the_harmonic_mean():
    assert model_utility([0.5, 0.25, 1.0]) == pytest.approx(3 / (1 / 0.5 + 1 / 0.25 + 1 / 1.0))
    assert model_utility({"a": 0.2, "b": 0.8}) == pytest.approx(2 / (5 + 1.25))
    assert model_utility([0.5, 0.0]) == 0.0
    with pytest.raises(ValueError, match="values"):
        model_utility([])
    with pytest.raises(ValueError, match="values"):
        model_utility([0.5, -0.1])


# ----------------------------------------------------------------------------- likelihood on a model
def manual_answer_nll(model, tok, question: str, answer: str) -> torch.Tensor:
    encoded = encode_qa(tok, question, answer)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([encoded["input_ids"]])).logits[0].float(), -1)
    terms = [-logp[t - 1, y] for t, y in enumerate(encoded["labels"]) if y != IGNORE_INDEX]
    return torch.stack(terms).mean()


def test_answer_nll_against_manual_log_softmax_and_padding_invariance():
    tok, model = tiny_tokenizer(), tiny_model()
    rows = qa_rows()
    questions, answers = [r["question"] for r in rows], [r["answer"] for r in rows]
    assert len({len(encode_qa(tok, q, a)["input_ids"]) for q, a in zip(questions, answers, strict=True)}) > 1
    batched = answer_nll(model, tok, questions, answers, batch_size=4)
    assert batched.dtype == torch.float32 and batched.device.type == "cpu" and batched.shape == (6,)
    for i in range(len(rows)):
        single = answer_nll(model, tok, questions[i : i + 1], answers[i : i + 1], batch_size=1)
        assert torch.allclose(batched[i], single[0], atol=1e-5)
        assert torch.allclose(batched[i], manual_answer_nll(model, tok, questions[i], answers[i]), atol=1e-5)
    probs = answer_probability(model, tok, questions, answers, batch_size=16)
    assert torch.allclose(probs, torch.exp(-batched), atol=1e-6)
    assert answer_nll(model, tok, [], []).shape == (0,)
    with pytest.raises(ValueError, match="questions/answers"):
        answer_nll(model, tok, questions, answers[:2])
    with pytest.raises(ValueError, match="batch_size"):
        answer_nll(model, tok, questions, answers, batch_size=0)


def test_answer_nll_restores_modes_and_handles_bf16():
    tok, model = tiny_tokenizer(), tiny_model()
    model.train()
    model.model.layers[0].eval()  # a submodule with its own mode must keep it
    rows = qa_rows(0, 3)
    questions, answers = [r["question"] for r in rows], [r["answer"] for r in rows]
    fp32 = answer_nll(model, tok, questions, answers)
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    bf16 = answer_nll(model.to(torch.bfloat16), tok, questions, answers)
    assert bf16.dtype == torch.float32 and bf16.device.type == "cpu"
    assert torch.allclose(bf16, fp32, rtol=0.05, atol=0.05)


def test_truth_ratio_on_a_model_matches_answer_nll():
    tok, model = tiny_tokenizer(), tiny_model()
    rows = qa_rows(0, 3)
    ratios = truth_ratio(model, tok, rows, batch_size=3)
    for i, row in enumerate(rows):
        para = manual_answer_nll(model, tok, row["question"], row["paraphrased_answer"])
        pert = torch.stack(
            [manual_answer_nll(model, tok, row["question"], a) for a in row["perturbed_answer"]]
        )
        assert float(ratios[i]) == pytest.approx(math.exp(float(para - pert.mean())), rel=1e-4)


def test_greedy_batched_equals_unbatched():
    tok, model = tiny_tokenizer(), tiny_model(seed=2)
    questions = [r["question"] for r in qa_rows()]
    lengths = {len(tok(format_question(q), add_special_tokens=False)["input_ids"]) for q in questions}
    assert len(lengths) > 1  # so the batch really is left-padded
    batched = greedy_answers(model, tok, questions, max_new_tokens=6, batch_size=6)
    single = [greedy_answers(model, tok, [q], max_new_tokens=6, batch_size=1)[0] for q in questions]
    assert batched == single
    assert all(isinstance(a, str) and "</s>" not in a and "<pad>" not in a for a in batched)
    assert any(batched)
    assert greedy_answers(model, tok, []) == []


def test_greedy_answers_stop_at_eos():
    tok, model = tiny_tokenizer(), tiny_model()
    eos_logits = torch.zeros(len(tok))
    eos_logits[tok.eos_token_id] = 10.0
    # EOS is the argmax at every step, so every answer is empty
    handle = model.lm_head.register_forward_hook(lambda module, args, out: eos_logits.expand_as(out))
    try:
        assert greedy_answers(model, tok, ["Who wrote the red book?", "Where?"], max_new_tokens=4) == ["", ""]
    finally:
        handle.remove()


# ------------------------------------------------------------------------------- evaluate + reports
def test_evaluate_reference_against_itself_and_reports(tmp_path):
    tok, model = tiny_tokenizer(), tiny_model()
    import datasets

    splits = {
        "forget": datasets.Dataset.from_list(qa_rows(0, 3)),
        "retain": qa_rows(3, 6),
        "general": qa_rows(1, 4),
    }
    kw = {"batch_size": 4, "max_new_tokens": 4, "progress": False}
    model.train()
    own = evaluate(model, tok, splits, **kw)
    assert model.training  # mode restored
    assert own.forget_quality is None  # absent without a reference, not faked
    assert own.splits["forget"].kind == "forget" and own.splits["retain"].kind == "utility"
    forget = own.splits["forget"]
    assert forget.truth_ratios == pytest.approx(truth_ratio(model, tok, splits["forget"]).tolist(), rel=1e-5)
    assert forget.truth_ratio_stat == pytest.approx(truth_ratio_statistic(forget.truth_ratios, "forget"))
    assert forget.probability == pytest.approx(sum(forget.probabilities) / 3)
    values = [
        getattr(own.splits[s], a)
        for s in ("retain", "general")
        for a in ("probability", "rouge_l", "truth_ratio_stat")
    ]
    assert own.model_utility == pytest.approx(model_utility(values))

    assert evaluate(model, tok, splits, reference=model, **kw).forget_quality == 1.0
    against_result = evaluate(model, tok, splits, reference=own, **kw)
    assert against_result.forget_quality == 1.0
    tensor_ref = evaluate(model, tok, splits, reference=torch.tensor([5.0, 6.0, 7.0]), **kw)
    assert tensor_ref.forget_quality == pytest.approx(
        stats.ks_2samp(forget.truth_ratios, [5.0, 6.0, 7.0]).pvalue
    )
    other = evaluate(tiny_model(seed=3), tok, splits, reference=own, **kw)
    assert 0.0 <= other.forget_quality <= 1.0 and 0.0 <= other.model_utility <= 1.0

    against_result.splits["forget"].truth_ratios[0] = math.inf  # JSON has no inf: survives as a string
    data = json.loads(json.dumps(against_result.to_dict(), allow_nan=False))
    restored = EvaluationResult.from_dict(data)
    assert restored == against_result

    table = format_table({"target": against_result, "retain": own, "NPO": other})
    lines = table.splitlines()
    assert "forget quality" in lines[0] and "forget ROUGE-L" in lines[0] and "retain prob" in lines[0]
    assert lines[2].startswith("target") and lines[3].startswith("retain") and " - " in lines[3] + " "
    write_json(tmp_path / "sub" / "r.json", {"target": against_result, "n": torch.tensor(3), "x": math.nan})
    loaded = json.loads((tmp_path / "sub" / "r.json").read_text())
    assert loaded["n"] == 3 and loaded["x"] == "nan" and loaded["target"]["forget_quality"] == 1.0
    plot_tradeoff({"target": against_result, "retain": own, "NPO": other}, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png", "sub"]  # no temp files left
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["r.json"]


def test_evaluate_validates_its_inputs():
    tok, model = tiny_tokenizer(), tiny_model()
    splits = {"forget": qa_rows(0, 2), "retain": qa_rows(2, 4)}
    kw = {"batch_size": 4, "max_new_tokens": 2, "progress": False, "utility_splits": ("retain",)}
    with pytest.raises(ValueError, match="forget_split"):
        evaluate(model, tok, {"retain": splits["retain"]}, **kw)
    with pytest.raises(ValueError, match="utility_splits"):
        evaluate(model, tok, splits, **{**kw, "utility_splits": ("retain", "general")})
    with pytest.raises(ValueError, match="empty split"):
        evaluate(model, tok, {**splits, "forget": []}, **kw)
    broken = [{k: v for k, v in row.items() if k != "paraphrased_answer"} for row in splits["retain"]]
    with pytest.raises(ValueError, match="missing column"):
        evaluate(model, tok, {**splits, "retain": broken}, **kw)
    with pytest.raises(ValueError, match="reference"):
        evaluate(model, tok, splits, reference="retain-model", **kw)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, tok, splits, **{**kw, "batch_size": 0})
    with pytest.raises(ValueError, match="results"):
        format_table({})


def test_option_splits_use_the_answer_share_of_its_options(monkeypatch):
    """TOFU's real-authors / world-facts sets: probability = P~(a) / (P~(a) + sum_j P~(perturbed_j)),
    the truth ratio uses the answer itself, even when the row has a paraphrase."""
    rows = [
        {"question": "q1", "answer": "a1", "perturbed_answer": ["x", "y"]},
        {"question": "q2", "answer": "a2", "perturbed_answer": ["z"], "paraphrased_answer": "p2"},
    ]
    table = {"a1": 0.5, "x": 1.0, "y": 2.0, "a2": 3.0, "z": 0.25, "p2": 1.5}
    monkeypatch.setattr(
        metrics_module, "answer_nll", lambda m, t, q, answers, **kw: torch.tensor([table[a] for a in answers])
    )
    monkeypatch.setattr(
        metrics_module, "greedy_answers", lambda m, t, questions, **kw: ["a1", "no"][: len(questions)]
    )
    splits = {"forget": [{**rows[1], "paraphrased_answer": "p2"}], "facts": rows}
    result = evaluate(None, None, splits, utility_splits=("facts",), option_splits=("facts",), progress=False)
    facts = result.splits["facts"]
    assert facts.kind == "options"
    share = [
        math.exp(-0.5) / (math.exp(-0.5) + math.exp(-1.0) + math.exp(-2.0)),
        math.exp(-3.0) / (math.exp(-3.0) + math.exp(-0.25)),
    ]
    assert facts.probabilities == pytest.approx(share)
    # R = exp(NLL(answer) - mean NLL(perturbed)), the paraphrase p2 unused; statistic mean(max(0, 1 - R))
    ratios = [math.exp(0.5 - 1.5), math.exp(3.0 - 0.25)]
    assert facts.truth_ratios == pytest.approx(ratios)
    assert facts.truth_ratio_stat == pytest.approx((1 - ratios[0]) / 2)
    assert result.model_utility == pytest.approx(model_utility([sum(share) / 2, 0.5, (1 - ratios[0]) / 2]))
    plain = evaluate(None, None, {**splits, "facts": [rows[1]]}, utility_splits=("facts",), progress=False)
    assert plain.splits["facts"].probabilities == pytest.approx([math.exp(-3.0)])
    with pytest.raises(ValueError, match="option_splits"):
        evaluate(None, None, splits, utility_splits=(), option_splits=("world_facts",), progress=False)
    with pytest.raises(ValueError, match="option_splits: contains the forget split"):
        evaluate(None, None, splits, utility_splits=(), option_splits=("forget",), progress=False)
    with pytest.raises(ValueError, match="missing column"):
        no_options = [{"question": "q", "answer": "a"}]
        evaluate(None, None, {**splits, "facts": no_options}, utility_splits=(), option_splits=("facts",))
