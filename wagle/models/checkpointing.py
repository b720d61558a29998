"""Activation (gradient) checkpointing for Hugging Face models, on for the duration of a block.

Each decoder layer keeps only its input in the forward pass and recomputes its activations during
backward: activation memory drops from ``layers x (everything a layer saves)`` to ``layers x hidden``
per token, for about one extra forward pass of compute. Hugging Face applies it only to modules whose
``training`` flag is set. With ``keep_eval=True`` only those modules' own flags are set, and only for
the decision: the checkpointed function (the layer's forward, in the forward pass and again in its
recompute) runs with the flag cleared. Layers that apply dropout from their own flag (OPT's
``dropout(..., training=self.training)``) and every child module therefore compute exactly as in
``eval()``: the gradients are those of the plain eval-mode model, bit for bit, and runs repeat.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch

from wagle.errors import UserError

_REENTRANT_FREE = {"use_reentrant": False}  # frozen inputs (e.g. a frozen embedding) still get grads


def _enable(model: torch.nn.Module) -> None:
    # transformers >= 5.20 renamed gradient_checkpointing_enable (deprecated there) to this
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=_REENTRANT_FREE)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=_REENTRANT_FREE)


def _disable(model: torch.nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def checkpointed_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules that decide on checkpointing (decoder layers, or the base model in older transformers)."""
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]


def _in_eval(module: torch.nn.Module, checkpoint: Callable) -> Callable:
    """A checkpoint function that runs the checkpointed function with ``module.training`` cleared."""

    def run_in_eval(function, *args, **kwargs):
        @functools.wraps(function)
        def evaluated(*inner_args, **inner_kwargs):
            module.training = False
            try:
                return function(*inner_args, **inner_kwargs)
            finally:
                module.training = True

        return checkpoint(evaluated, *args, **kwargs)

    return run_in_eval


def _deciding_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose ``training`` flag turns checkpointing on: the decoder layers themselves
    (``GradientCheckpointingLayer``, transformers >= 4.52), else the base model that loops over them."""
    modules = checkpointed_modules(model)
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: the base model decides
        return modules
    layers = [m for m in modules if isinstance(m, GradientCheckpointingLayer)]
    return layers or modules


@contextlib.contextmanager
def activation_checkpointing(
    model: torch.nn.Module, enabled: bool = True, *, keep_eval: bool = False
) -> Iterator[None]:
    """Turn on activation checkpointing for the block and restore the previous setting after it.

    ``keep_eval=True`` (for a model in ``eval()`` mode, as during attribution) sets the ``training``
    flag of the checkpointing modules alone, so that they checkpoint, and clears it while their
    checkpointed forward runs (and is recomputed) and again afterwards: dropout stays off. Raises
    ``ValueError`` for a model that does not support checkpointing."""
    if not enabled:
        yield
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(
            f"gradient_checkpointing: {type(model).__name__} does not support activation checkpointing "
            "(a Hugging Face PreTrainedModel with supports_gradient_checkpointing=True is needed)"
        )
    was_enabled = bool(checkpointed_modules(model))
    if not was_enabled:
        _enable(model)
    flagged = []
    try:
        if keep_eval:
            for module in _deciding_modules(model):
                if not module.training:
                    checkpoint = module._gradient_checkpointing_func
                    flagged.append((module, checkpoint))
                    module.training = True
                    module._gradient_checkpointing_func = _in_eval(module, checkpoint)
        yield
    finally:
        for module, checkpoint in flagged:
            module.training = False
            module._gradient_checkpointing_func = checkpoint
        if not was_enabled:
            _disable(model)
