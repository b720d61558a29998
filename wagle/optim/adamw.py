"""``MaskedAdamW``: AdamW that updates only the weights a :class:`~wagle.WeightMask` selects."""

from __future__ import annotations

import torch

from wagle.errors import UserError
from wagle.mask import WeightMask
from wagle_kernels.masked_adamw import AdamWScalars, masked_adamw_step_torch, masked_adamw_step_triton

from .masked import MaskedOptimizer, ParamPlan, require_nonnegative


class MaskedAdamW(MaskedOptimizer):
    """AdamW restricted to a weight mask.

    Selected weights follow ``torch.optim.AdamW`` (same formula and operation order, fp32 math):
    with ``t`` the parameter's step count,

        p <- p * (1 - lr * wd)
        m <- m + (1 - beta1) * (g - m)
        v <- beta2 * v + (1 - beta2) * g^2
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    Unselected weights stay bit-for-bit unchanged and own no state (unless ``decay_unselected``).

    Args:
        params: ``(name, tensor)`` pairs (``model.named_parameters()``) or param groups (dicts) whose
            ``params`` are such pairs; group entries override the defaults below.
        mask: the :class:`~wagle.WeightMask`; entries are matched by name and their shapes checked.
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW``.
        state_layout: ``"dense"`` (param-shaped moments), ``"compact"`` (moments for the selected
            weights only: state memory = ratio x dense, plus 8 bytes of index metadata per 2048 weights
            on the Triton path) or ``"auto"`` (per parameter, compact where the moments it saves
            cover its index metadata: :func:`wagle.optim.masked.auto_layout`; dense with
            ``decay_unselected``). ``optimizer.layouts()`` gives the resolved layouts.
        state_dtype: dtype of the moments, ``torch.float32`` or ``torch.bfloat16`` (math is fp32).
        decay_unselected: reproduce the reference implementation (multiply the gradient by the mask,
            then plain AdamW over every weight, so weight decay and the moments still move unselected
            weights); needs dense state (``"dense"`` or ``"auto"``).
        unmasked: parameters without a mask entry: ``"error"`` (raise), ``"dense"`` (update every weight)
            or ``"freeze"`` (never update, no state).
        fused: ``True`` runs the Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1),
            ``False`` the torch path, ``None`` the kernel for CUDA parameters and torch otherwise.

    ``optimizer.state[p]`` holds ``step`` (a float32 CPU tensor, as torch.optim), ``exp_avg`` and
    ``exp_avg_sq`` (param-shaped, or 1-D with ``mask.selected(name)`` entries where the layout is
    compact).
    ``launches`` is the number of Triton launches of the last :meth:`step` (one per up to 16 tensors of
    a (layout, dtype, device) bucket).
    """

    state_tensor_keys = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params,
        mask: WeightMask,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        state_layout: str = "auto",
        state_dtype: torch.dtype = torch.float32,
        decay_unselected: bool = False,
        unmasked: str = "error",
        fused: bool | None = None,
    ):
        require_nonnegative(lr=lr, eps=eps, weight_decay=weight_decay)
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise UserError(f"betas: expected two values in [0, 1), got {betas}")
        self.decay_unselected = bool(decay_unselected)
        self.launches = 0
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

    def touches_unselected(self) -> bool:
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
            float(group["lr"]),
            group["betas"],
            float(group["eps"]),
            float(group["weight_decay"]),
            state["step"].item(),
        )

    def _step_items(self, group: dict, items: list[tuple[torch.Tensor, ParamPlan, torch.Tensor]]) -> None:
        scalars = {id(param): self._advance(group, param, plan) for param, plan, _ in items}
        buckets, rest = self.fused_buckets(items)
        launches = 0
        for (masked, compact, *_), members in buckets.items():
            device = members[0][0].device
            states = [self.state[param] for param, _, _ in members]
            launches += masked_adamw_step_triton(
                [param for param, _, _ in members],
                [grad for _, _, grad in members],
                [state["exp_avg"] for state in states],
                [state["exp_avg_sq"] for state in states],
                [plan.bits(device) for _, plan, _ in members] if masked else None,
                [plan.prefix(device) for _, plan, _ in members] if compact else None,
                [scalars[id(param)] for param, _, _ in members],
                decay_all=masked and self.decay_unselected,
            )
        for param, plan, grad in rest:
            state = self.state[param]
            masked_adamw_step_torch(
                param.data,
                grad,
                state["exp_avg"],
                state["exp_avg_sq"],
                plan.selected_flat(param.device) if plan.masked else None,
                scalars[id(param)],
                compact=plan.compact,
                decay_all=plan.masked and self.decay_unselected,
                index=plan.indices(param.device) if plan.masked and not self.decay_unselected else None,
            )
        self.launches = launches
