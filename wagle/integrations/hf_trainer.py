"""Masked training for Hugging Face ``Trainer``-based unlearning code (e.g. OpenUnlearning).

Mix :class:`WagleTrainerMixin` into an existing Trainer subclass, or let :func:`masked` do it::

    MaskedNPO = wagle.integrations.masked(NPOTrainer)          # cached subclass named "MaskedNPO"
    trainer = MaskedNPO(..., wagle_mask="mask.safetensors")    # everything else unchanged

The Trainer still builds the optimizer itself (``create_optimizer``, a subclass's override included):
its trainable set (``requires_grad`` as the subclass leaves it), its weight-decay groups (no decay for
norms and biases, as the installed transformers decides), its learning rate, betas, eps and schedule;
only the optimizer class is swapped for the masked counterpart of ``args.optim`` (see
:mod:`wagle.integrations.hf_optim`), so only the selected weights of those parameters change and
optimizer state exists only for them. Gradient clipping follows ``wagle_clip_mode``
(:mod:`wagle.optim.clipping`; default ``"mask_then_clip"``: the global norm over the selected gradient
entries). Supported setups: one device, or DDP.

Or pass ``optimizers=(masked_adamw_from_training_args(model, mask, args), None)`` to a plain Trainer.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

from wagle.errors import UserError
from wagle.mask import WeightMask, masked_trainable
from wagle.optim import MaskedAdamW, MaskedOptimizer
from wagle.optim.clipping import check_clip_mode, mask_gradients_

from .hf_optim import bind, masked_from_torch_optimizer, masked_kwargs, masked_optimizer_spec
from .hf_setup import (
    check_mask_argument,
    keep_checkpointing_differentiable,
    reject_unsupported_setup,
    resolve_mask,
)

logger = logging.getLogger(__name__)

STATE_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def masked_adamw_from_training_args(
    model: torch.nn.Module,
    mask: WeightMask,
    args,
    *,
    state_layout: str = "compact",
    state_dtype: torch.dtype = torch.float32,
) -> MaskedAdamW:
    """A :class:`MaskedAdamW` configured from ``transformers.TrainingArguments`` (lr, betas, eps,
    weight decay for every parameter); trains only parameters with selected weights. A Trainer with
    :class:`WagleTrainerMixin` keeps the Trainer's own decay groups instead."""
    mask.check_compatible(model)
    return MaskedAdamW(
        masked_trainable(model.named_parameters(), mask),
        mask,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
        state_layout=state_layout,
        state_dtype=state_dtype,
        unmasked="freeze",
    )


def _state_dtype(value) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in STATE_DTYPES.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in STATE_DTYPES:
        return STATE_DTYPES[value.removeprefix("torch.")]
    raise UserError(f"wagle_state_dtype: expected float32 or bfloat16, got {value!r}")


def _inner(optimizer):
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` wrapper (or itself)."""
    return getattr(optimizer, "optimizer", optimizer)


class WagleTrainerMixin:
    """Makes a ``transformers.Trainer`` subclass update only the weights ``wagle_mask`` selects.

    Keyword arguments (all others go to the Trainer):
        wagle_mask: a :class:`~wagle.WeightMask` or the path of a mask file (loaded with
            :meth:`WeightMask.load` and checked against the model).
        wagle_state_layout: ``"compact"`` (moments for the selected weights only) or ``"dense"``.
        wagle_state_dtype: moments in ``float32`` (default) or ``bfloat16``.
        wagle_clip_mode: ``"mask_then_clip"`` (default; the Trainer's ``max_grad_norm`` applies to the
            global norm of the selected gradient entries: after every backward the unselected entries
            are zeroed and the gradients of parameters that do not train are dropped, and those
            parameters are set to ``requires_grad=False`` so no gradient is computed for them) or
            ``"clip_then_mask"`` (the Trainer clips every gradient it computes, as the reference
            implementation does; ``requires_grad`` is left as the framework sets it).

    Parameters with a selected weight keep full-size gradients; parameters the Trainer's optimizer
    does not hold, without a mask entry or without a selected weight never change. Resuming from a
    Trainer checkpoint needs the optimizer state saved (``save_only_model=False``).
    """

    def __init__(
        self,
        *args,
        wagle_mask: WeightMask | str | os.PathLike,
        wagle_state_layout: str = "compact",
        wagle_state_dtype: torch.dtype | str = torch.float32,
        wagle_clip_mode: str = "mask_then_clip",
        **kwargs,
    ):
        check_mask_argument(wagle_mask)
        if wagle_state_layout not in ("compact", "dense"):
            raise UserError(f"wagle_state_layout: expected 'compact' or 'dense', got {wagle_state_layout!r}")
        self.wagle_state_layout = wagle_state_layout
        self.wagle_state_dtype = _state_dtype(wagle_state_dtype)
        self.wagle_clip_mode = check_clip_mode(wagle_clip_mode, "wagle_clip_mode")
        self.wagle_optimizer: MaskedOptimizer | None = None
        self._wagle_untrained: list[torch.Tensor] = []
        super().__init__(*args, **kwargs)
        reject_unsupported_setup(self)
        self.wagle_mask = resolve_mask(wagle_mask, self.model)
        if self.optimizer is not None and not isinstance(_inner(self.optimizer), MaskedOptimizer):
            raise TypeError(
                "optimizers: a WagleTrainerMixin trainer builds its masked optimizer itself (pass no "
                f"optimizer, or a wagle masked optimizer), got {type(_inner(self.optimizer)).__name__}"
            )

    def _wagle_options(self) -> dict:
        return {
            "state_layout": self.wagle_state_layout,
            "state_dtype": self.wagle_state_dtype,
            "unmasked": "freeze",
        }

    @contextlib.contextmanager
    def _wagle_optimizer_hook(self) -> Iterator[None]:
        """While the Trainer's ``create_optimizer`` runs, ``get_optimizer_cls_and_kwargs`` (and a given
        ``optimizer_cls_and_kwargs``) return the masked class bound to the mask and parameter names."""
        trainer_cls = type(self)

        def masked_cls_and_kwargs(args, model=None):
            masked, kwargs = masked_optimizer_spec(trainer_cls, args, model)
            return bind(
                masked, model if model is not None else self.model, self.wagle_mask, **self._wagle_options()
            ), kwargs

        given = getattr(self, "optimizer_cls_and_kwargs", None)
        shadowed = self.__dict__.get("get_optimizer_cls_and_kwargs")
        self.get_optimizer_cls_and_kwargs = masked_cls_and_kwargs
        if given is not None:
            masked, kwargs = masked_kwargs(given[0], given[1], "optimizer_cls_and_kwargs")
            bound = bind(masked, self.model, self.wagle_mask, **self._wagle_options())
            self.optimizer_cls_and_kwargs = (bound, kwargs)
        try:
            yield
        finally:
            if shadowed is None:
                del self.get_optimizer_cls_and_kwargs
            else:
                self.get_optimizer_cls_and_kwargs = shadowed
            if given is not None:
                self.optimizer_cls_and_kwargs = given

    def create_optimizer(self, *args, **kwargs):
        fresh = self.optimizer is None
        with self._wagle_optimizer_hook():
            super().create_optimizer(*args, **kwargs)
        if fresh:
            optimizer = _inner(self.optimizer)
            if not isinstance(optimizer, MaskedOptimizer):  # the subclass built a torch optimizer itself
                self.optimizer = masked_from_torch_optimizer(
                    optimizer, self.model, self.wagle_mask, **self._wagle_options()
                )
        self.wagle_optimizer = _inner(self.optimizer)
        self._wagle_restrict_training()
        return self.optimizer

    def _wagle_restrict_training(self) -> None:
        """Record which parameters the optimizer updates; with ``mask_then_clip`` no other parameter
        computes a gradient. Fix up reentrant checkpointing when the embeddings end up frozen."""
        optimizer = self.wagle_optimizer
        trained = {id(p) for p, plan in optimizer.named_plans() if not optimizer.skips(plan)}
        if not trained:
            raise UserError(
                "wagle_mask: selects no weight of a parameter the Trainer's optimizer trains (check the mask "
                "against the trainer's trainable parameters, e.g. a trainable_params_regex)"
            )
        self._wagle_untrained = [p for p in self.model.parameters() if id(p) not in trained]
        if self.wagle_clip_mode == "mask_then_clip":
            for param in self._wagle_untrained:
                param.requires_grad_(False)
        logger.info(
            "masked optimizer %s trains %d tensors (%d selected weights)",
            type(optimizer).__name__,
            len(trained),
            sum(plan.selected for p, plan in optimizer.named_plans() if id(p) in trained),
        )
        keep_checkpointing_differentiable(self)

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if self.wagle_clip_mode == "mask_then_clip" and self.wagle_optimizer is not None:
            mask_gradients_(self.wagle_optimizer)
            for param in self._wagle_untrained:
                param.grad = None
        return loss


_MASKED_CLASSES: dict[type, type] = {}


def masked(trainer_cls: type) -> type:
    """The masked variant of a ``transformers.Trainer`` subclass: ``class Masked<Name>(WagleTrainerMixin,
    trainer_cls)``, created once per class (the same class object on every call), e.g. for a registry
    keyed by class name (``TRAINER_REGISTRY["MaskedNPO"] = masked(NPO)``)."""
    from transformers import Trainer  # late: importing wagle does not import transformers' Trainer

    if not isinstance(trainer_cls, type) or not issubclass(trainer_cls, Trainer):
        raise TypeError(f"trainer_cls: expected a transformers.Trainer subclass, got {trainer_cls!r}")
    if issubclass(trainer_cls, WagleTrainerMixin):
        return trainer_cls
    cls = _MASKED_CLASSES.get(trainer_cls)
    if cls is None:
        name = f"Masked{trainer_cls.__name__}"
        cls = type(
            name,
            (WagleTrainerMixin, trainer_cls),
            {
                "__module__": __name__,
                "__qualname__": name,
                "__doc__": f"{trainer_cls.__name__} with a wagle mask.",
            },
        )
        _MASKED_CLASSES[trainer_cls] = cls
    return cls
