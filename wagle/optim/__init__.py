"""Masked optimizers: only the weights a WeightMask selects are updated, with state only for them.

* :class:`MaskedAdamW` - torch.optim.AdamW on the selected weights (fused Triton kernel or torch path),
  dense, compact (selected-only) or per-parameter automatic (``auto_layout``) moments, fp32 or bf16
  state;
* :class:`MaskedSGD` - torch.optim.SGD (momentum, Nesterov, weight decay) on the selected weights;
* :class:`StepInBackward` - step each parameter inside ``backward()`` and free its gradient, with
  gradient accumulation in compact (selected-only) buffers and per-parameter clipping;
* :func:`clip_masked_grad_norm_` - global-norm clipping over the selected gradient entries
  (``"mask_then_clip"``, the default) or the full gradients (``"clip_then_mask"``).
"""

from .adamw import MaskedAdamW
from .clipping import CLIP_MODES, clip_masked_grad_norm_, mask_gradients_
from .in_backward import NonFiniteGradientError, StepInBackward
from .masked import MaskedOptimizer, ParamPlan, auto_layout
from .sgd import MaskedSGD

__all__ = [
    "CLIP_MODES",
    "MaskedAdamW",
    "MaskedOptimizer",
    "MaskedSGD",
    "NonFiniteGradientError",
    "ParamPlan",
    "StepInBackward",
    "auto_layout",
    "clip_masked_grad_norm_",
    "mask_gradients_",
]
