"""Models: tokenizer round trip, tiny Llama factory, local save/load, fine-tuning and its errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import tiny_model, tiny_tokenizer

from wagle.data import generate_rows
from wagle.models import finetune, load_model, make_tiny_llama, save_model


def test_tokenizer_round_trip_and_specials():
    tok = tiny_tokenizer()
    text = "Question: Where was Arlen Ashgrove born?\nAnswer: In Port Alder, 1961."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert {tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token} == {"<pad>", "<s>", "</s>", "<unk>"}


def test_tiny_llama_is_deterministic_and_sized_to_tokenizer():
    a, b = tiny_model(seed=3), tiny_model(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert a.config.vocab_size == len(tiny_tokenizer())
    assert not torch.equal(next(tiny_model(seed=4).parameters()), next(a.parameters()))


def test_save_and_load_local_directory(tmp_path):
    tok, model = tiny_tokenizer(), tiny_model()
    path = tmp_path / "tiny"
    save_model(model, tok, path)
    save_model(model, tok, path)  # replacing an existing folder is safe
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    loaded, loaded_tok = load_model(path)
    ids = torch.tensor([tok("Question: hi", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-6)
    assert loaded_tok.pad_token_id == tok.pad_token_id
    bf16, _ = load_model(path, dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path / "empty")
    file_path = tmp_path / "file.bin"
    file_path.write_text("x")
    with pytest.raises(NotADirectoryError):
        load_model(file_path)
    classifier = tmp_path / "classifier"
    classifier.mkdir()
    (classifier / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"]}))
    with pytest.raises(ValueError, match="not a causal language model"):
        load_model(classifier)


def test_finetune_lowers_loss():
    tok = tiny_tokenizer()
    model = make_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    rows = generate_rows(num_authors=10)["forget10"]
    stats = finetune(model, tok, rows, epochs=15, lr=1e-2, batch_size=4, progress=False)
    first = finetune(
        make_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        tok,
        rows,
        epochs=1,
        lr=1e-9,
        batch_size=4,
        progress=False,
    )
    assert stats["final_loss"] < 0.6 * first["final_loss"]
    with pytest.raises(ValueError, match="epochs"):
        finetune(model, tok, rows, epochs=0, lr=1e-3, batch_size=4, progress=False)
