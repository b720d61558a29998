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


def check_sequence_length(model: torch.nn.Module, length: int, *, what: str, option: str) -> None:
    """Raise :class:`~wagle.errors.UserError` when ``length`` tokens do not fit the model's positions.

    ``what`` names the sequence (e.g. ``"forget batch 3"``), ``option`` the setting that shortens it
    (e.g. ``"--max-length / max_length"``)."""
    limit = position_limit(model)
    if limit is not None and length > limit:
        raise UserError(
            f"{what}: {length} tokens, but {type(model).__name__} has {limit} positions; "
            f"set {option} to {limit} or less"
        )


__all__ = ["check_sequence_length", "position_limit"]
