"""``MaskedAdamW``: AdamW that updates only the weights a :class:`~wagle.WeightMask` selects."""

from __future__ import annotations

import torch

from wagle.mask import WeightMask
from wagle_kernels.masked_adamw import (
    AdamWScalars,
    masked_adamw_multi_step_triton,
    masked_adamw_step_torch,
    masked_adamw_step_triton,
)

from .masked import MaskedOptimizer, ParamPlan, require_nonnegative


class MaskedAdamW(MaskedOptimizer):
    """AdamW restricted to a weight mask.

    Selected weights follow ``torch.optim.AdamW`` exactly (decoupled decay ``p *= 1 - lr*wd``,
    ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g^2``, bias-corrected step
    ``p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)``); unselected weights stay bit-for-bit
    unchanged and own no state.

    Args:
        params: ``(name, tensor)`` pairs (``model.named_parameters()``) or param groups of such pairs.
        mask: the :class:`~wagle.WeightMask` (entries matched by name, shapes checked).
        state_layout: ``dense`` (param-shaped moments) or ``compact`` (moments for selected weights
            only: state memory = ratio x dense).
        state_dtype: dtype of the moments (float32 or bfloat16).
        decay_unselected: reproduce the reference implementation (mask the gradient, then plain AdamW
            over all weights, so weight decay still shrinks unselected weights); dense layout only.
        unmasked: what to do with parameters that have no mask entry: ``error``, ``dense`` (update
            fully) or ``freeze``.
        fused: True runs the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1), False the torch
            path, None picks the kernel for CUDA parameters.
    """

    def __init__(
        self,
        params,
        mask: WeightMask,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        state_layout: str = "dense",
        state_dtype: torch.dtype = torch.float32,
        decay_unselected: bool = False,
        unmasked: str = "error",
        fused: bool | None = None,
    ):
        require_nonnegative(lr=lr, eps=eps, weight_decay=weight_decay)
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas: each must be in [0, 1), got {betas}")
        if decay_unselected and state_layout == "compact":
            raise ValueError("decay_unselected=True updates every weight, so it needs state_layout='dense'")
        self.decay_unselected = decay_unselected
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(
            params,
            mask,
            defaults,
            state_layout=state_layout,
            state_dtype=state_dtype,
            unmasked=unmasked,
            fused=fused,
        )

    def _touches_unselected(self) -> bool:
        return self.decay_unselected

    def _advance(self, group: dict, param: torch.Tensor, plan: ParamPlan) -> AdamWScalars:
        """Create the state on first use, count the step, and return this step's scalars."""
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = self.new_state_tensor(param, plan)
            state["exp_avg_sq"] = self.new_state_tensor(param, plan)
        state["step"] += 1
        return AdamWScalars.make(
            group["lr"], group["betas"], group["eps"], group["weight_decay"], int(state["step"].item())
        )

    def _step_group(self, group: dict, items: list[tuple[torch.Tensor, ParamPlan]]) -> None:
        """Fused parameters go out in one multi-tensor launch per (layout, dtypes, device) bucket."""
        buckets: dict[tuple, list[tuple[torch.Tensor, ParamPlan]]] = {}
        rest = []
        for param, plan in items:
            if self.decay_unselected or not self.use_fused(param):
                rest.append((param, plan))
                continue
            masked = plan.kind == "masked"
            key = (
                masked,
                masked and self.state_layout == "compact",
                param.dtype,
                param.grad.dtype,
                param.device,
            )
            buckets.setdefault(key, []).append((param, plan))
        for (masked, compact, *_), members in buckets.items():
            scalars = [self._advance(group, p, plan) for p, plan in members]
            states = [self.state[p] for p, _ in members]
            launched = masked_adamw_multi_step_triton(
                [p.data for p, _ in members],
                [p.grad for p, _ in members],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [plan.packed for _, plan in members] if masked else None,
                [plan.prefix() for _, plan in members] if compact else None,
                scalars,
            )
            if not launched:  # addresses not element-aligned: one launch per tensor
                for (param, plan), step_scalars in zip(members, scalars, strict=True):
                    self._apply(param, plan, step_scalars)
        for param, plan in rest:
            self._step_param(group, param, plan)

    def _step_param(self, group: dict, param: torch.Tensor, plan: ParamPlan) -> None:
        self._apply(param, plan, self._advance(group, param, plan))

    def _apply(self, param: torch.Tensor, plan: ParamPlan, scalars: AdamWScalars) -> None:
        state = self.state[param]
        masked = plan.kind == "masked"
        compact = masked and self.state_layout == "compact"
        grad = param.grad
        if masked and self.decay_unselected:  # the reference procedure: grad * mask, then plain AdamW
            grad = grad * plan.flat_mask().view(param.shape)
            masked = False
        if self.use_fused(param):
            masked_adamw_step_triton(
                param.data,
                grad,
                state["exp_avg"],
                state["exp_avg_sq"],
                plan.packed if masked else None,
                plan.prefix() if compact else None,
                scalars,
            )
        else:
            masked_adamw_step_torch(
                param.data,
                grad,
                state["exp_avg"],
                state["exp_avg_sq"],
                plan.flat_mask() if masked else None,
                scalars,
                compact=compact,
            )
