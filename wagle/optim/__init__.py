"""Masked optimizers: only the weights a WeightMask selects are updated, with state only for them."""

from .adamw import MaskedAdamW
from .in_backward import StepInBackward
from .masked import MaskedOptimizer
from .sgd import MaskedSGD

__all__ = ["MaskedAdamW", "MaskedOptimizer", "MaskedSGD", "StepInBackward"]
