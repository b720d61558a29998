"""Integrations with other training stacks (Hugging Face Trainer)."""

from .hf_trainer import WagleTrainerMixin, masked, masked_adamw_from_training_args

__all__ = ["WagleTrainerMixin", "masked", "masked_adamw_from_training_args"]
