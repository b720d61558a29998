"""Encoding forget/retain data sets for unlearning, and a resumable deterministic batch order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from wagle.data.format import encode_qa, encode_text, pad_batch


def _rows(dataset, role: str) -> list[Mapping]:
    if dataset is None:
        raise ValueError(f"{role}: no data set given")
    rows = [dict(r) for r in dataset] if not isinstance(dataset, list) else list(dataset)
    if not rows:
        raise ValueError(f"{role}: the {role} set is empty")
    return rows


def encode_examples(
    dataset, tokenizer, *, role: str, max_length: int = 256, answer_column: str = "answer"
) -> list[dict[str, list[int]]]:
    """Tokenize every example once (QA: answer-only labels; text: all tokens) and tag its index."""
    rows = _rows(dataset, role)
    first = rows[0]
    if "question" in first and answer_column in first:
        encoded = [encode_qa(tokenizer, r["question"], r[answer_column], max_length) for r in rows]
    elif "text" in first:
        encoded = [encode_text(tokenizer, r["text"], max_length) for r in rows]
    else:
        raise ValueError(
            f"{role}: examples need 'question' and '{answer_column}' columns (QA) or a 'text' column; "
            f"got {sorted(first)}"
        )
    for index, example in enumerate(encoded):
        example["example_index"] = index
    return encoded


def collate(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of encoded examples and keep their ``example_index``."""
    batch = pad_batch(examples, pad_token_id)
    batch["example_index"] = torch.tensor([e["example_index"] for e in examples], dtype=torch.long)
    return batch


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
        yield collate(examples[start : start + batch_size], pad_token_id)
