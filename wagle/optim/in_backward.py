"""Optimizer step in backward: step each parameter as soon as its gradient is complete, then free it.

With ``register_post_accumulate_grad_hook`` a parameter is stepped during ``loss.backward()`` right
after its gradient has been accumulated, and the gradient is dropped, so a model-sized gradient buffer
never exists at once (peak gradient memory ~ the largest few tensors instead of the whole model).

Limits: the step happens before the backward pass has finished, so nothing that needs all gradients
at once is possible - in particular global-norm gradient clipping (``clip_grad_norm_`` over all
parameters) and optimizer closures. The practical alternative offered here is per-parameter clipping
(``clip_norm_per_param``: each gradient is clipped to that norm on its own); or clip the loss scale
instead, or run the ordinary ``optimizer.step()`` when exact global clipping matters.
"""

from __future__ import annotations

import torch

from .masked import MaskedOptimizer


class StepInBackward:
    """Attach ``optimizer`` to its parameters' post-accumulate-grad hooks.

    Every ``accumulation_steps``-th backward through a parameter steps it (gradients of the micro-
    batches in between accumulate in ``.grad`` as usual; scale the loss by ``1/accumulation_steps``).
    Call :meth:`remove` to detach. Call your LR scheduler after each full accumulation cycle.
    """

    def __init__(
        self,
        optimizer: MaskedOptimizer,
        accumulation_steps: int = 1,
        clip_norm_per_param: float | None = None,
    ):
        if not isinstance(optimizer, MaskedOptimizer):
            raise TypeError("optimizer: expected a wagle MaskedAdamW/MaskedSGD")
        if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps: must be an integer >= 1, got {accumulation_steps!r}")
        if clip_norm_per_param is not None and not clip_norm_per_param > 0:
            raise ValueError(f"clip_norm_per_param: must be > 0, got {clip_norm_per_param!r}")
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.clip_norm_per_param = clip_norm_per_param
        self._counts: dict[int, int] = {}
        self._handles = []
        for group in optimizer.param_groups:
            for param in group["params"]:
                if optimizer.plan(param).kind == "frozen" or not param.requires_grad:
                    continue
                self._handles.append(param.register_post_accumulate_grad_hook(self._hook))

    def _hook(self, param: torch.Tensor) -> None:
        count = self._counts.get(id(param), 0) + 1
        self._counts[id(param)] = count
        if count % self.accumulation_steps:
            return
        if self.clip_norm_per_param is not None:
            torch.nn.utils.clip_grad_norm_([param], self.clip_norm_per_param)
        self.optimizer.step_param(param)
        self.optimizer._opt_called = True  # LR schedulers check that the optimizer stepped
        param.grad = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> StepInBackward:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
