"""Drop-in masked optimizer for Hugging Face ``Trainer``-based unlearning code (e.g. OpenUnlearning).

Either pass ``optimizers=(masked_adamw_from_training_args(model, mask, args), None)`` to a Trainer,
or mix :class:`WagleTrainerMixin` into an existing Trainer subclass::

    class MaskedNPOTrainer(WagleTrainerMixin, NPOTrainer):
        pass

    trainer = MaskedNPOTrainer(..., wagle_mask=mask)   # everything else unchanged

The Trainer's own learning rate, Adam betas/epsilon, weight decay and LR schedule are used; only the
weights the mask selects change, and AdamW state exists only for them (compact layout). Parameters
without a mask entry are frozen.
"""

from __future__ import annotations

import torch

from wagle.errors import UserError
from wagle.mask import WeightMask
from wagle.optim import MaskedAdamW


def masked_adamw_from_training_args(
    model: torch.nn.Module,
    mask: WeightMask,
    args,
    *,
    state_layout: str = "compact",
    state_dtype: torch.dtype = torch.float32,
) -> MaskedAdamW:
    """A :class:`MaskedAdamW` configured from ``transformers.TrainingArguments`` (lr, betas, eps,
    weight decay); trains only parameters with selected weights."""
    mask.check_compatible(model)
    named = [
        (n, p) for n, p in model.named_parameters() if p.requires_grad and n in mask and mask.selected(n) > 0
    ]
    if not named:
        raise UserError("mask: selects no weight of a trainable parameter")
    return MaskedAdamW(
        named,
        mask,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
        state_layout=state_layout,
        state_dtype=state_dtype,
        unmasked="freeze",
    )


class WagleTrainerMixin:
    """Makes a ``transformers.Trainer`` subclass build a :class:`MaskedAdamW` from ``wagle_mask``.

    Parameters the mask does not select are set to ``requires_grad=False`` so no gradient memory is
    spent on them.
    """

    def __init__(self, *args, wagle_mask: WeightMask, wagle_state_layout: str = "compact", **kwargs):
        if not isinstance(wagle_mask, WeightMask):
            raise TypeError(f"wagle_mask: expected a wagle.WeightMask, got {type(wagle_mask).__name__}")
        self.wagle_mask = wagle_mask
        self.wagle_state_layout = wagle_state_layout
        super().__init__(*args, **kwargs)
        wagle_mask.check_compatible(self.model)
        for name, param in self.model.named_parameters():
            if name not in wagle_mask or wagle_mask.selected(name) == 0:
                param.requires_grad_(False)

    def create_optimizer(self, *args, **kwargs):
        if self.optimizer is None:
            self.optimizer = masked_adamw_from_training_args(
                self.model, self.wagle_mask, self.args, state_layout=self.wagle_state_layout
            )
        return self.optimizer
