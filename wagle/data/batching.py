"""Tokenized, padded batches for training, attribution and unlearning."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from .format import encode_qa, encode_text, pad_batch
from .loading import validate_dataset


def encode_dataset(dataset, tokenizer, *, max_length: int = 256, answer_column: str = "answer") -> list[dict]:
    """Encode every row (QA: answer-only labels; text: all tokens); adds ``example_index``."""
    schema = validate_dataset(dataset, role="data") if answer_column == "answer" else "qa"
    rows = dataset if isinstance(dataset, list) else dataset.to_list()
    encoded = []
    for index, row in enumerate(rows):
        if schema == "qa":
            if answer_column not in row:
                raise ValueError(f"answer_column: {answer_column!r} is not a column of the data")
            example = encode_qa(tokenizer, row["question"], row[answer_column], max_length)
        else:
            example = encode_text(tokenizer, row["text"], max_length)
        example["example_index"] = index
        encoded.append(example)
    return encoded


def collate_examples(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """``pad_batch`` plus the ``example_index`` of each row."""
    batch = pad_batch(examples, pad_token_id)
    batch["example_index"] = torch.tensor([e["example_index"] for e in examples], dtype=torch.long)
    return batch


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer: has neither a pad nor an eos token")
    return pad


def make_dataloader(
    dataset,
    tokenizer,
    *,
    batch_size: int,
    max_length: int = 256,
    shuffle: bool = False,
    seed: int = 0,
    answer_column: str = "answer",
) -> DataLoader:
    """A DataLoader of padded batches (``input_ids``, ``attention_mask``, ``labels``, ``example_index``)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length: must be an integer >= 2, got {max_length!r}")
    examples = encode_dataset(dataset, tokenizer, max_length=max_length, answer_column=answer_column)
    pad = pad_id_of(tokenizer)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        examples,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=lambda items: collate_examples(items, pad),
    )
