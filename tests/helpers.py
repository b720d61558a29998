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
