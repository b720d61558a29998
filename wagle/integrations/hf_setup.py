"""Checks and fixes around a Hugging Face ``Trainer`` run with a masked optimizer: unsupported
distributed setups (DeepSpeed, FSDP) are refused with a clear error, a mask given as a file path is
loaded, and reentrant gradient checkpointing is made to work when the input embeddings are frozen."""

from __future__ import annotations

import logging
import os

import torch

from wagle.errors import UserError
from wagle.mask import WeightMask

logger = logging.getLogger(__name__)

SUPPORTED_SETUPS = "one device, or DDP (torchrun / accelerate multi-GPU without DeepSpeed or FSDP)"


def check_mask_argument(mask) -> None:
    """Raise a TypeError unless ``mask`` is a :class:`~wagle.WeightMask` or a mask file path."""
    if not isinstance(mask, WeightMask | str | os.PathLike):
        raise TypeError(
            f"wagle_mask: expected a wagle.WeightMask or the path of a mask file, got {type(mask).__name__}"
        )


def resolve_mask(mask: WeightMask | str | os.PathLike, model: torch.nn.Module) -> WeightMask:
    """``mask`` itself, or the mask file at that path (:meth:`WeightMask.load`), checked against ``model``
    (raises :class:`~wagle.MaskMismatchError` for a mask of another model)."""
    check_mask_argument(mask)
    if not isinstance(mask, WeightMask):
        mask = WeightMask.load(mask)
    mask.check_compatible(model)
    return mask


def reject_unsupported_setup(trainer) -> None:
    """Raise a ValueError for setups whose parameters the masked optimizer cannot pair with the mask:
    DeepSpeed (any ZeRO stage: its engine flattens and partitions parameters and wraps the optimizer),
    FSDP, or parameters already partitioned by DeepSpeed ZeRO-3 (``ds_id`` attributes, empty tensors)."""
    args = trainer.args
    state = getattr(getattr(trainer, "accelerator", None), "state", None)
    plugin = getattr(state, "deepspeed_plugin", None)
    if (
        getattr(trainer, "is_deepspeed_enabled", False)
        or getattr(args, "deepspeed", None)
        or plugin is not None
    ):
        stage = getattr(plugin, "zero_stage", None)
        where = f"DeepSpeed ZeRO stage {stage}" if stage is not None else "DeepSpeed"
        raise UserError(
            f"WagleTrainerMixin: {where} is not supported (DeepSpeed flattens and partitions the parameters "
            "and runs its own optimizer wrapper, so they cannot be paired with mask entries); run on "
            f"{SUPPORTED_SETUPS}: e.g. launch accelerate with a config without deepspeed_config"
        )
    if (
        getattr(trainer, "is_fsdp_enabled", False)
        or getattr(trainer, "is_fsdp_xla_enabled", False)
        or (getattr(args, "fsdp", None))
    ):
        raise UserError(
            f"WagleTrainerMixin: FSDP is not supported (sharded flat parameters); run on {SUPPORTED_SETUPS}"
        )
    model = trainer.model
    partitioned = [n for n, p in model.named_parameters() if hasattr(p, "ds_id") or hasattr(p, "ds_numel")]
    if partitioned:
        raise UserError(
            f"WagleTrainerMixin: parameters such as {partitioned[0]!r} are partitioned by DeepSpeed ZeRO-3 "
            "(empty local tensors), which is not supported; load the model without a ZeRO-3 config and run "
            f"on {SUPPORTED_SETUPS}"
        )


def checkpointing_requested(trainer) -> bool:
    """Whether the run uses activation (gradient) checkpointing: requested in the TrainingArguments
    (``gradient_checkpointing``, or ``activation_checkpointing`` in newer transformers) or already on."""
    args = trainer.args
    model = trainer.model
    return bool(
        getattr(args, "activation_checkpointing", False)
        or getattr(args, "gradient_checkpointing", False)
        or getattr(model, "is_activation_checkpointing", None)
        or (
            not hasattr(model, "is_activation_checkpointing")
            and getattr(model, "is_gradient_checkpointing", False)
        )
    )


def keep_checkpointing_differentiable(trainer) -> bool:
    """With checkpointing on and the input embeddings frozen, make the embedding output require grad
    (``model.enable_input_require_grads()``, as transformers does for PEFT), so reentrant checkpointed
    layers (transformers 4.x's default) still get gradients. Returns True if the hook was added."""
    model = trainer.model
    if not checkpointing_requested(trainer) or not hasattr(model, "enable_input_require_grads"):
        return False
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is None or weight.requires_grad or getattr(model, "_require_grads_hook", None) is not None:
        return False
    model.enable_input_require_grads()
    logger.info("frozen input embeddings with gradient checkpointing: their output now requires grad")
    return True
