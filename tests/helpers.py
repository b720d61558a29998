"""Small shared builders for tests: a tiny tokenizer and Llama trained/initialised locally."""

from __future__ import annotations

import functools

from wagle.data.benchmark import generate_rows
from wagle.data.format import format_answer, format_question
from wagle.models import make_tiny_llama, train_tokenizer


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    rows = generate_rows(num_authors=20, seed=0)
    texts = []
    for row in rows["full"] + rows["general"]:
        texts.append(format_question(row["question"]) + format_answer(row["answer"]))
        texts.append(row["paraphrased_answer"])
        texts.extend(row["perturbed_answer"])
    return train_tokenizer(texts, vocab_size=400)


def tiny_model(seed: int = 0, hidden_size: int = 32):
    return make_tiny_llama(
        tiny_tokenizer(), hidden_size=hidden_size, num_layers=1, num_heads=2, intermediate_size=64, seed=seed
    ).eval()


def random_llama(vocab_size: int = 64, hidden_size: int = 16, intermediate_size: int = 24, seed: int = 0):
    """A 2-layer Llama for random-token tests (no tokenizer needed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()
