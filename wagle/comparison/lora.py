"""The LoRA baseline: low-rank adapters on the attention projections instead of a weight mask.

As in the WAGLE paper: r = 8, alpha = 32 (scale alpha / r = 4) on ``q_proj`` and ``v_proj``, no
dropout, no bias. peft freezes every base weight; :func:`wagle.unlearn` then trains only the adapter
weights (it trains exactly the parameters with ``requires_grad``) with the study's objective, AdamW,
lr schedule and clipping. The adapters start at B = 0, so the adapted model equals the target model
at step 0 (and NPO's reference log-probabilities are the target's).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from wagle.errors import UserError

LORA_R = 8
LORA_ALPHA = 32
LORA_TARGETS = ("q_proj", "v_proj")


def require_peft() -> None:
    """Raise a one-line UserError when peft is not installed."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise UserError("methods: the 'lora' baseline needs the peft package (pip install peft)") from None


def add_lora(
    model: torch.nn.Module,
    *,
    r: int = LORA_R,
    alpha: int = LORA_ALPHA,
    targets: Sequence[str] = LORA_TARGETS,
    seed: int = 0,
) -> torch.nn.Module:
    """Wrap ``model`` (modified in place) in peft LoRA adapters; A is initialised from ``seed`` (the
    global torch RNG is left as it was), B = 0. Only the adapter weights require gradients."""
    require_peft()
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    device = next(model.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        try:
            wrapped = get_peft_model(model, config)
        except ValueError as exc:
            raise UserError(f"lora_targets: {exc}") from None
    return wrapped


def lora_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable (adapter) parameters of a peft-wrapped model."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
