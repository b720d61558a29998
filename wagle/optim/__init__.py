"""Masked optimizers: only the weights a WeightMask selects are updated, with state only for them.

* :class:`MaskedAdamW` - torch.optim.AdamW on the selected weights (fused Triton kernel or torch path),
  dense or compact (selected-only) moments, fp32 or bf16 state;
* :class:`MaskedSGD` - torch.optim.SGD (momentum, Nesterov, weight decay) on the selected weights;
* :class:`StepInBackward` - step each parameter inside ``backward()`` and free its gradient, with
  gradient accumulation in compact (selected-only) buffers and per-parameter clipping.
"""

from .adamw import MaskedAdamW
from .in_backward import NonFiniteGradientError, StepInBackward
from .masked import MaskedOptimizer, ParamPlan
from .sgd import MaskedSGD

__all__ = [
    "MaskedAdamW",
    "MaskedOptimizer",
    "MaskedSGD",
    "NonFiniteGradientError",
    "ParamPlan",
    "StepInBackward",
]
