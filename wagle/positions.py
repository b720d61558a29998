"""The longest sequence a model can embed: models with a learned absolute-position table (GPT-2's
``wpe``, OPT's ``embed_positions``) index it by position, so a longer input fails deep inside the
embedding with an ``IndexError``. Rotary/ALiBi models have no such table and no hard limit."""

from __future__ import annotations

import torch

from wagle.errors import UserError


def position_limit(model: torch.nn.Module) -> int | None:
    """Positions in the model's learned absolute-position embedding, or ``None`` when it has none.

    The table is the ``nn.Embedding`` named ``wpe`` or ``*position*`` (its rows minus the ``offset``
    OPT reserves for padding)."""
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Embedding) and (leaf == "wpe" or "position" in leaf):
            return int(module.num_embeddings) - int(getattr(module, "offset", 0) or 0)
    return None


def check_sequence_length(
    model: torch.nn.Module, length: int, *, what: str, option: str, used: int = 0
) -> None:
    """Raise :class:`~wagle.errors.UserError` when ``length`` tokens do not fit the model's positions.

    ``what`` names the sequence (e.g. ``"forget gradients: batch 3"``), ``option`` the setting that
    shortens it; ``used`` tokens of ``length`` do not come from that option (a generation prompt), so
    the option's largest value that fits is ``limit - used``."""
    limit = position_limit(model)
    if limit is not None and length > limit:
        raise UserError(
            f"{what}: {length} tokens, more than the {limit} positions of {type(model).__name__}; "
            f"set {option} to {max(limit - used, 0)} or less"
        )


def check_examples(model: torch.nn.Module, examples, *, role: str) -> None:
    """:func:`check_sequence_length` for the longest of encoded ``examples`` (dicts with ``input_ids``)."""
    if examples:
        longest = max(len(example["input_ids"]) for example in examples)
        check_sequence_length(
            model, longest, what=f"{role} set: longest example", option="max_length (CLI: --max-length)"
        )


__all__ = ["check_examples", "check_sequence_length", "position_limit"]
