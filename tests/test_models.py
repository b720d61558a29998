"""Models: tokenizer round trip, tiny Llama factory, local save/load, fine-tuning and its errors."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from helpers import tiny_model, tiny_tokenizer

from wagle.data import format_question, generate_benchmark, generate_rows
from wagle.demo.models import TinyRecipe
from wagle.models import (
    DemoModels,
    build_demo_models,
    finetune,
    load_model,
    make_tiny_llama,
    save_model,
    train_tokenizer,
)
from wagle.models.tiny import qa_corpus


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and do not slow down when other processes share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_llama(seed: int = 0, hidden_size: int = 32):
    return make_tiny_llama(
        tiny_tokenizer(), hidden_size=hidden_size, num_layers=1, num_heads=2, intermediate_size=64, seed=seed
    )


def greedy(model, tok, question: str, max_new_tokens: int = 48) -> str:
    ids = [tok.bos_token_id] + tok(format_question(question), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    return tok.decode(out[0, len(ids) :], skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_specials():
    tok = tiny_tokenizer()
    rows = generate_rows(num_authors=20)
    texts = [
        "Question: Where was Arlen Ashgrove born?\nAnswer: In Port Alder, 1961.",
        "  two  spaces, tabs\tand unicode: café, naïve, 東京, emoji 🙂 ",
    ]
    for row in rows["full"] + rows["general"]:
        texts += [format_question(row["question"]), " " + row["answer"], *row["perturbed_answer"]]
    for text in texts:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert {tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token} == {"<pad>", "<s>", "</s>", "<unk>"}
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4
    ids = tok(" The Silent Harbour.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == " The Silent Harbour."
    assert len(tok) == 400


def test_tokenizer_training_is_deterministic_and_checked():
    corpus = qa_corpus(generate_benchmark(num_authors=10))
    a, b = train_tokenizer(corpus, vocab_size=350), train_tokenizer(iter(corpus), vocab_size=350)
    assert a.get_vocab() == b.get_vocab() and len(a) == 350
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(corpus, vocab_size=100)
    with pytest.raises(ValueError, match="texts"):
        train_tokenizer(["", ""])
    with pytest.raises(TypeError, match="texts"):
        train_tokenizer("a single string")


# ------------------------------------------------------------------------------------------- models


def test_tiny_llama_is_deterministic_and_sized_to_tokenizer():
    state = torch.random.get_rng_state()
    a, b = tiny_model(seed=3), tiny_model(seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert a.config.vocab_size == len(tiny_tokenizer()) and a.config.tie_word_embeddings is False
    assert a.get_input_embeddings().weight.data_ptr() != a.get_output_embeddings().weight.data_ptr()
    assert a.config.pad_token_id == tiny_tokenizer().pad_token_id
    assert not torch.equal(next(tiny_model(seed=4).parameters()), next(a.parameters()))
    default = make_tiny_llama(tiny_tokenizer())
    assert (default.config.hidden_size, default.config.num_hidden_layers) == (128, 4)
    assert (default.config.num_attention_heads, default.config.intermediate_size) == (4, 256)
    with pytest.raises(ValueError, match="hidden_size"):
        make_tiny_llama(tiny_tokenizer(), hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="num_layers"):
        make_tiny_llama(tiny_tokenizer(), num_layers=0)


def test_save_and_load_local_directory(tmp_path):
    tok, model = tiny_tokenizer(), tiny_model()
    path = tmp_path / "tiny"
    save_model(model, tok, path)
    save_model(model, tok, str(path))  # replacing an existing folder is safe
    assert sorted(os.listdir(tmp_path)) == ["tiny"]  # no temporary folders left behind
    assert "model.safetensors" in os.listdir(path) and "config.json" in os.listdir(path)
    loaded, loaded_tok = load_model(path, device="cpu")
    assert not loaded.training
    ids = torch.tensor([tok("Question: hi", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded_tok.get_vocab() == tok.get_vocab()
    text = "Question: Where was Zelda Blackwood born?\nAnswer: café"
    assert loaded_tok.decode(loaded_tok(text, add_special_tokens=False)["input_ids"]) == text
    assert (loaded_tok.pad_token_id, loaded_tok.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    bf16, _ = load_model(path, dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="dtype"):
        load_model(path, dtype="bf16")


def test_load_model_sets_a_missing_pad_token_to_eos(tmp_path):
    no_pad = copy.deepcopy(tiny_tokenizer())
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    model = tiny_model()
    save_model(model, no_pad, tmp_path / "m")
    _, loaded_tok = load_model(tmp_path / "m")
    assert loaded_tok.pad_token == loaded_tok.eos_token == "</s>"


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        load_model(tmp_path / "empty")
    file_path = tmp_path / "file.bin"
    file_path.write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        load_model(file_path)
    cases = {
        "classifier": (
            {"architectures": ["BertForSequenceClassification"], "model_type": "bert"},
            "not a causal",
        ),
        "vision": ({"model_type": "vit"}, "has no causal language model class"),
        "unknown": ({"model_type": "no-such-model"}, "unusable config.json"),
        "weightless": ({**tiny_model().config.to_dict()}, "could not load a causal LM"),
    }
    for name, (config, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=message):
            load_model(folder)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(broken)
    # transformers raises OSError, ImportError (its slow-tokenizer fallback, without protobuf) or
    # ValueError for these, depending on its version (4.45 / 4.51 / 4.57 / 5.x differ); load_model
    # turns each into ValueError
    no_tokenizer = tmp_path / "no_tokenizer"
    save_model(tiny_model(), None, no_tokenizer)
    with pytest.raises(ValueError, match=r"no usable tokenizer \(the folder has no tokenizer files\)"):
        load_model(no_tokenizer)
    corrupt = tmp_path / "corrupt_tokenizer"
    save_model(tiny_model(), tiny_tokenizer(), corrupt)
    (corrupt / "tokenizer.json").write_text("{nope")
    with pytest.raises(ValueError, match="no usable tokenizer: "):
        load_model(corrupt)


def test_save_model_is_atomic(tmp_path):
    tok, model = tiny_tokenizer(), tiny_model()
    path = tmp_path / "model"
    save_model(model, tok, path)
    before = {f: (path / f).read_bytes() for f in os.listdir(path)}

    class Exploding:
        def save_pretrained(self, directory):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_model(tiny_model(seed=1), Exploding(), path)
    assert {f: (path / f).read_bytes() for f in os.listdir(path)} == before
    assert sorted(os.listdir(tmp_path)) == ["model"]
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(NotADirectoryError, match="path"):
        save_model(model, tok, tmp_path / "a_file")


# --------------------------------------------------------------------------------------- fine-tuning


def test_finetune_memorises_and_is_deterministic():
    tok = tiny_tokenizer()
    rows = generate_rows(num_authors=10)["full"][:20]
    model = make_tiny_llama(tok, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128)
    state = torch.random.get_rng_state()
    stats = finetune(model, tok, rows, epochs=40, lr=1e-2, batch_size=5, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert set(stats) >= {"final_loss", "first_epoch_loss", "steps", "seconds"}
    assert stats["steps"] == 160 and stats["examples"] == 20
    assert stats["final_loss"] < 0.05 < 3.0 < stats["first_epoch_loss"]
    answers = [greedy(model, tok, row["question"]) for row in rows]
    assert answers == [row["answer"] for row in rows]  # memorised and decoded to readable text
    again = make_tiny_llama(tok, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128)
    finetune(again, tok, rows, epochs=2, lr=1e-2, batch_size=5, progress=False)
    third = make_tiny_llama(tok, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128)
    finetune(third, tok, rows, epochs=2, lr=1e-2, batch_size=5, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(again.parameters(), third.parameters(), strict=True))
    assert not model.training


def test_finetune_trains_only_answers(capsys):
    """Question tokens carry no loss: a model fine-tuned on QA does not learn to produce questions."""
    tok = tiny_tokenizer()
    rows = [{"question": "Zelda Zelda Zelda?", "answer": "yes"}] * 4
    model = small_llama()
    finetune(model, tok, rows, epochs=40, lr=1e-2, batch_size=4, warmup_ratio=0.0, progress=False)
    assert capsys.readouterr().err == ""  # progress=False: no progress bar
    question_ids = tok(" Zelda Zelda", add_special_tokens=False)["input_ids"]
    prefix = [tok.bos_token_id] + tok("Question:", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prefix + question_ids])).logits[0]
    probability_of_question = logits[len(prefix) - 1].softmax(-1)[question_ids[0]]
    assert float(probability_of_question) < 0.05
    assert greedy(model, tok, "Zelda Zelda Zelda?") == "yes"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": 1.5}, "epochs"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"warmup_ratio": 1.0}, "warmup_ratio"),
        ({"warmup_ratio": -0.1}, "warmup_ratio"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"max_length": 1}, "max_length"),
    ],
)
def test_finetune_rejects_bad_options(kwargs, message):
    options = {"epochs": 1, "lr": 1e-3, "batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        finetune(small_llama(), tiny_tokenizer(), [{"text": "x"}], progress=False, **options)


def test_build_demo_models_quick():
    built = build_demo_models(forget_split="forget05", quick=True, progress=False, num_threads=2)
    assert torch.get_num_threads() == 1  # restored
    assert isinstance(built, DemoModels) and set(built.stats) == {"target", "retain"}
    recipe = TinyRecipe.quick()
    assert built.benchmark["full"].num_rows == 5 * recipe.num_authors
    assert built.stats["target"]["examples"] == built.benchmark["full"].num_rows + 60
    assert built.stats["retain"]["examples"] == built.benchmark["retain95"].num_rows + 60
    assert len(built.tokenizer) == recipe.vocab_size == built.target.config.vocab_size
    assert any(
        not torch.equal(p, q)
        for p, q in zip(built.target.parameters(), built.retain.parameters(), strict=True)
    )
    with pytest.raises(ValueError, match="forget_split"):
        build_demo_models(forget_split="forget20", quick=True, progress=False)
