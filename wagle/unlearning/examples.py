"""Encoding forget/retain data sets for unlearning, and a resumable deterministic batch order."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from wagle.data.batching import collate_examples, encode_dataset
from wagle.errors import UserError


def encode_examples(
    dataset, tokenizer, *, role: str, max_length: int = 256, answer_column: str = "answer"
) -> list[dict[str, list[int]]]:
    """Tokenize every example once (QA: answer-only labels; text: all tokens) and tag its index."""
    if dataset is None:
        raise UserError(f"{role}: no data set given")
    return encode_dataset(dataset, tokenizer, max_length=max_length, answer_column=answer_column, role=role)


def micro_batch_indices(micro_step: int, num_examples: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of micro-batch ``micro_step`` in an endless stream of seeded epoch permutations.

    Epoch e is ``randperm(num_examples)`` from a generator seeded with ``seed * 100003 + e``; micro-batch
    j takes stream positions [j * b, (j + 1) * b). A function of (j, seed) only, so a resumed run
    sees exactly the batches an uninterrupted run would.
    """
    start = micro_step * batch_size
    indices: list[int] = []
    position = start
    while len(indices) < batch_size:
        epoch, offset = divmod(position, num_examples)
        generator = torch.Generator().manual_seed(seed * 100003 + epoch)
        order = torch.randperm(num_examples, generator=generator).tolist()
        take = min(batch_size - len(indices), num_examples - offset)
        indices.extend(order[offset : offset + take])
        position += take
    return indices


def ordered_batches(examples: Sequence[dict], batch_size: int, pad_token_id: int):
    """All examples once, in order, as padded batches (for precomputation passes)."""
    for start in range(0, len(examples), batch_size):
        yield collate_examples(list(examples[start : start + batch_size]), pad_token_id)
