"""``MaskedSGD``: SGD (momentum, Nesterov, weight decay) that updates only masked weights."""

from __future__ import annotations

import torch

from wagle.mask import WeightMask
from wagle_kernels.masked_sgd import SGDScalars, masked_sgd_step_torch, masked_sgd_step_triton

from .masked import MaskedOptimizer, ParamPlan, require_nonnegative


class MaskedSGD(MaskedOptimizer):
    """SGD restricted to a weight mask, following ``torch.optim.SGD`` on selected weights.

    ``d = g + wd * p``; momentum buffer ``b = d`` on the first step, then
    ``b = momentum * b + (1 - dampening) * d``; ``d = d + momentum * b`` (Nesterov) or ``d = b``;
    ``p -= lr * d``. Unselected weights are untouched and own no buffer; ``state_layout="compact"``
    keeps the buffer for selected weights only. Other arguments as in :class:`MaskedAdamW`.
    """

    def __init__(
        self,
        params,
        mask: WeightMask,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        state_layout: str = "dense",
        state_dtype: torch.dtype = torch.float32,
        unmasked: str = "error",
        fused: bool | None = None,
    ):
        require_nonnegative(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov: requires momentum > 0 and dampening = 0")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
        }
        super().__init__(
            params,
            mask,
            defaults,
            state_layout=state_layout,
            state_dtype=state_dtype,
            unmasked=unmasked,
            fused=fused,
        )

    def _step_param(self, group: dict, param: torch.Tensor, plan: ParamPlan) -> None:
        scalars = SGDScalars(
            group["lr"], group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"]
        )
        state = self.state[param]
        buf, first = None, False
        if scalars.momentum:
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = self.new_state_tensor(param, plan)
                first = True
            buf = state["momentum_buffer"]
        masked = plan.kind == "masked"
        compact = masked and self.state_layout == "compact"
        if self.use_fused(param):
            masked_sgd_step_triton(
                param.data,
                param.grad,
                buf,
                plan.packed if masked else None,
                plan.prefix() if compact else None,
                scalars,
                first=first,
            )
        else:
            masked_sgd_step_torch(
                param.data,
                param.grad,
                buf,
                plan.flat_mask() if masked else None,
                scalars,
                first=first,
                compact=compact,
            )
