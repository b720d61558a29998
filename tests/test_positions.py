"""Sequences longer than a model's learned position table (GPT-2 n_positions, OPT
max_position_embeddings) are refused with the model's limit, in attribution, unlearning, evaluation
and the CLI, instead of an IndexError deep inside the embedding."""

from __future__ import annotations

import pytest
import torch
from helpers import random_llama, tiny_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

from wagle import attribute, unlearn
from wagle.cli import main
from wagle.data import generate_rows, write_benchmark
from wagle.errors import UserError
from wagle.evaluation.metrics import answer_nll, greedy_answers
from wagle.models import save_model
from wagle.positions import position_limit

LIMIT = 24


def gpt2(vocab=64):
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab,
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=LIMIT,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def opt(vocab=64):
    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=vocab,
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=LIMIT,
        word_embed_proj_dim=16,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return OPTForCausalLM(config).eval()


def batch(length):
    ids = torch.randint(3, 64, (2, length))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_position_limits():
    assert position_limit(gpt2()) == LIMIT and position_limit(opt()) == LIMIT
    assert position_limit(random_llama()) is None  # rotary: no table, no hard limit


@pytest.mark.parametrize("build", [gpt2, opt])
@pytest.mark.parametrize("method", ["wagle", "wanda"])
def test_attribution_refuses_batches_longer_than_the_positions(build, method):
    model = build()
    attribute(model, [batch(LIMIT)], [batch(LIMIT)], ratio=0.5, method=method, progress=False)  # fits exactly
    with pytest.raises(
        UserError,
        match=rf"batch 1: {LIMIT + 1} tokens, more than the {LIMIT} positions.*"
        rf"--max-length\) to {LIMIT} or less",
    ):
        attribute(model, [batch(5), batch(LIMIT + 1)], [batch(5)], ratio=0.5, method=method, progress=False)


@pytest.mark.parametrize("build", [gpt2, opt])
def test_unlearning_and_evaluation_refuse_too_long_examples(build):
    tok = tiny_tokenizer()
    model = build(vocab=len(tok))
    rows = generate_rows(num_authors=20, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(UserError, match=rf"forget set: longest example: \d+ tokens, more than the {LIMIT}"):
        unlearn(
            model,
            rows["forget10"],
            rows["retain90"],
            tokenizer=tok,
            method="grad_diff",
            steps=1,
            max_length=64,
            progress=False,
        )
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    questions = [r["question"] for r in rows["forget10"][:3]]
    answers = [r["answer"] for r in rows["forget10"][:3]]
    with pytest.raises(UserError, match="evaluation set: longest example"):
        answer_nll(model, tok, questions, answers, max_length=64)
    with pytest.raises(
        UserError, match=r"generation: prompt of \d+ tokens \+ max_new_tokens=48.*--max-new-tokens"
    ):
        greedy_answers(model, tok, questions, max_new_tokens=48)


def test_cli_mask_with_a_too_long_max_length_is_one_line(tmp_path, capsys):
    tok = tiny_tokenizer()
    paths = write_benchmark(str(tmp_path / "data"), num_authors=20)
    save_model(gpt2(vocab=len(tok)), tok, str(tmp_path / "gpt2"))
    capsys.readouterr()
    code = main(
        [
            "mask",
            "--model",
            str(tmp_path / "gpt2"),
            "--forget",
            paths["forget10"],
            "--retain",
            paths["retain90"],
            "--ratio",
            "0.5",
            "--max-length",
            "64",
            "--out",
            str(tmp_path / "m.safetensors"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{LIMIT} positions" in err and "--max-length" in err, err
