"""Prompt formatting and tokenization conventions shared by training, unlearning and evaluation.

A QA pair is rendered as ``"Question: {question}\\nAnswer:"`` followed by ``" {answer}"`` and the
tokenizer's EOS token. Only answer tokens carry a loss (question tokens are labelled ``-100``), as in
TOFU and the WAGLE reference code. Plain-text examples (corpus-style forgetting) carry a loss on
every token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from wagle.errors import UserError

IGNORE_INDEX = -100
QUESTION_TEMPLATE = "Question: {question}\nAnswer:"


def format_question(question: str) -> str:
    """The prompt a model sees for ``question``; generation continues after it."""
    return QUESTION_TEMPLATE.format(question=question.strip())


def format_answer(answer: str) -> str:
    """The answer continuation (a leading space, no EOS)."""
    return " " + answer.strip()


def encode_qa(tokenizer, question: str, answer: str, max_length: int = 512) -> dict[str, list[int]]:
    """Token ids and labels for one QA pair; labels are ``-100`` on prompt tokens.

    The prompt and the answer are tokenized separately and concatenated, so the boundary between
    them is exact whatever the tokenizer merges. The answer is truncated (never the prompt) to fit
    ``max_length``; EOS is appended when it fits.
    """
    prompt_ids = tokenizer(format_question(question), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(format_answer(answer), add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    if tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    room = max_length - len(prompt_ids)
    if room <= 0:
        raise UserError(
            f"max_length={max_length} leaves no room for the answer: the prompt alone has "
            f"{len(prompt_ids)} tokens"
        )
    answer_ids = answer_ids[:room]
    return {
        "input_ids": prompt_ids + answer_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
    }


def encode_text(tokenizer, text: str, max_length: int = 512) -> dict[str, list[int]]:
    """Token ids and labels for a plain-text example: every token is a target."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    ids = ids[:max_length]
    return {"input_ids": ids, "labels": list(ids)}


def pad_batch(examples: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    if not examples:
        raise UserError("examples: cannot pad an empty batch")
    length = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
