"""Tokenized, padded batches for training, attribution and unlearning."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader

from wagle.errors import UserError
from wagle.validation import check_number

from .format import PromptFormat, encode_text, get_prompt_format, pad_batch
from .loading import validate_dataset

if TYPE_CHECKING:
    import datasets


def encode_dataset(
    dataset: datasets.Dataset | list[dict],
    tokenizer,
    *,
    max_length: int = 256,
    answer_column: str = "answer",
    role: str = "data",
    template: str | PromptFormat | None = None,
) -> list[dict]:
    """Encode every row (QA: answer-only labels; text: all tokens); adds ``example_index``.

    QA rows use the prompt format ``template`` (a preset name of :data:`wagle.data.PROMPT_FORMATS`
    or a :class:`~wagle.data.PromptFormat`; default ``wagle``).

    ``answer_column`` names the column holding the target answer of QA rows (``"answer"``, or e.g.
    a refusal column for preference optimisation); it must hold non-empty strings.
    """
    check_number("max_length", max_length, low=2, integer=True)
    fmt = get_prompt_format(template)
    if not isinstance(answer_column, str) or not answer_column:
        raise UserError(f"answer_column: must be a column name, got {answer_column!r}")
    schema = validate_dataset(dataset, role=role)
    if schema == "multiple_choice":
        raise UserError(
            f"{role} data: multiple-choice rows (question/choices/answer) are scored by evaluation only; "
            "train or unlearn from question/answer or text rows"
        )
    rows = dataset if isinstance(dataset, list) else dataset.to_list()
    if answer_column != "answer":
        if schema != "qa":
            raise UserError(
                f"answer_column: {answer_column!r} needs question/answer rows; the {role} data is plain text"
            )
        for index, row in enumerate(rows):
            value = row.get(answer_column)
            if not isinstance(value, str) or not value.strip():
                if index == 0 and answer_column not in row:
                    raise UserError(
                        f"answer_column: {answer_column!r} is not a column of the {role} data; "
                        f"found {sorted(row)}"
                    )
                raise UserError(
                    f"answer_column: row {index} of the {role} data has an empty or non-text "
                    f"{answer_column!r}"
                )
    encoded = []
    for index, row in enumerate(rows):
        if schema == "qa":
            example = fmt.encode(tokenizer, row["question"], row[answer_column], max_length)
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
    """The id used for padding: the tokenizer's pad token, else its EOS token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise UserError("tokenizer: has neither a pad nor an eos token")
    return int(pad)


def make_dataloader(
    dataset: datasets.Dataset | list[dict],
    tokenizer,
    *,
    batch_size: int,
    max_length: int = 256,
    shuffle: bool = False,
    seed: int = 0,
    answer_column: str = "answer",
    template: str | PromptFormat | None = None,
) -> DataLoader:
    """A DataLoader of right-padded batches (``input_ids``, ``attention_mask``, ``labels``,
    ``example_index``).

    QA rows get answer-only labels (:func:`~wagle.data.format.encode_qa`), text rows a loss on every
    token (:func:`~wagle.data.format.encode_text`). Rows are tokenized once, up front. With
    ``shuffle=True`` the order is a function of ``seed`` only. The loader's ``prompt_format``
    attribute holds the :class:`~wagle.data.PromptFormat` used (``attribute`` records it in masks).
    """
    check_number("batch_size", batch_size, low=1, integer=True)
    check_number("max_length", max_length, low=2, integer=True)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed: must be an integer, got {seed!r}")
    pad = pad_id_of(tokenizer)
    fmt = get_prompt_format(template)
    examples = encode_dataset(
        dataset, tokenizer, max_length=max_length, answer_column=answer_column, template=fmt
    )
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    loader = DataLoader(
        examples,
        batch_size=batch_size,
        shuffle=bool(shuffle),
        generator=generator,
        collate_fn=functools.partial(collate_examples, pad_token_id=pad),
    )
    loader.prompt_format = fmt
    return loader
