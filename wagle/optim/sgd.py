"""``MaskedSGD``: SGD (momentum, dampening, Nesterov, weight decay) that updates only masked weights."""

from __future__ import annotations

import torch

from wagle.errors import UserError
from wagle.mask import WeightMask
from wagle_kernels.masked_sgd import SGDScalars, masked_sgd_step_torch, masked_sgd_step_triton

from .masked import MaskedOptimizer, ParamPlan, require_nonnegative


class MaskedSGD(MaskedOptimizer):
    """SGD restricted to a weight mask, following ``torch.optim.SGD`` on the selected weights
    (the optimizer SalUn-style saliency unlearning uses).

        d <- g + wd * p
        b <- d (first step), then b <- momentum * b + (1 - dampening) * d
        d <- d + momentum * b (Nesterov) or d <- b (momentum > 0)
        p <- p - lr * d

    Unselected weights stay bit-for-bit unchanged and own no momentum buffer; ``state_layout="compact"``
    keeps the buffer for the selected weights only, ``"auto"`` (the default) decides per parameter as
    :class:`~wagle.optim.MaskedAdamW` does. ``optimizer.state[p]["momentum_buffer"]`` exists
    once a parameter has stepped with momentum > 0 (as in torch.optim.SGD). Other arguments as in
    :class:`~wagle.optim.MaskedAdamW`.
    """

    state_tensor_keys = ("momentum_buffer",)

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
        state_layout: str = "auto",
        state_dtype: torch.dtype = torch.float32,
        unmasked: str = "error",
        fused: bool | None = None,
    ):
        require_nonnegative(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise UserError("nesterov: requires momentum > 0 and dampening = 0")
        self.launches = 0
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

    def _step_items(self, group: dict, items: list[tuple[torch.Tensor, ParamPlan, torch.Tensor]]) -> None:
        s = SGDScalars(
            float(group["lr"]),
            float(group["momentum"]),
            float(group["dampening"]),
            float(group["weight_decay"]),
            bool(group["nesterov"]),
        )
        first: dict[int, bool] = {}
        for param, plan, _ in items:
            state = self.state[param]
            first[id(param)] = False
            if s.momentum != 0 and state.get("momentum_buffer") is None:
                state["momentum_buffer"] = self.new_state_tensor(param, plan)
                first[id(param)] = True
        buckets, rest = self.fused_buckets(items)
        launches = 0
        for (masked, compact, *_), members in buckets.items():
            device = members[0][0].device
            launches += masked_sgd_step_triton(
                [param for param, _, _ in members],
                [grad for _, _, grad in members],
                [self.state[param]["momentum_buffer"] for param, _, _ in members] if s.momentum else None,
                [plan.bits(device) for _, plan, _ in members] if masked else None,
                [plan.prefix(device) for _, plan, _ in members] if compact else None,
                s,
                first=[first[id(param)] for param, _, _ in members],
            )
        for param, plan, grad in rest:
            masked_sgd_step_torch(
                param.data,
                grad,
                self.state[param].get("momentum_buffer") if s.momentum else None,
                plan.selected_flat(param.device) if plan.masked else None,
                s,
                first=first[id(param)],
                compact=plan.compact,
                index=plan.indices(param.device) if plan.masked else None,
            )
        self.launches = launches
