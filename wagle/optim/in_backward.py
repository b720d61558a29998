"""Optimizer step in backward: step each parameter as soon as its gradient is complete, then free it.

With ``Tensor.register_post_accumulate_grad_hook`` a parameter is stepped during ``loss.backward()``
right after its gradient has been accumulated, and its ``.grad`` is dropped, so a model-sized gradient
buffer never exists: peak gradient memory is the few tensors autograd holds at once.

Gradient accumulation (step every ``accumulation_steps`` micro-batches): between steps, only the
*selected* entries of a masked parameter's gradient are kept, in a compact buffer of the gradient's
dtype (``mask.selected(name)`` elements, so accumulation memory = ratio x one gradient); the full
gradient is freed after every micro-batch. On the stepping micro-batch the buffer is added back into the
selected entries (``g_1 + ... + g_N`` in the same order as autograd's in-place accumulation, so the step
equals an ordinary accumulated step bit for bit). Parameters without a mask entry (``unmasked="dense"``)
accumulate their full gradient in ``.grad`` as usual; frozen parameters and masked ones without a
selected weight just have their gradient dropped.

Limits (the step happens before backward has finished):

* no global-norm clipping across parameters (``clip_grad_norm_`` over the model needs every gradient at
  once) and no optimizer closures, step hooks or ``GradScaler`` unscaling;
* every parameter must receive a gradient in every micro-batch (the accumulation count is kept per
  parameter);
* accumulated partial gradients are not part of ``state_dict()``: checkpoint at step boundaries.

Practical alternative to global clipping: ``clip_norm_per_param`` clips each parameter's (accumulated)
gradient on its own to that L2 norm, measured over the entries the optimizer uses (the selected ones
for masked parameters), like ``clip_grad_norm_([param], max_norm)`` applied to the masked gradient.
Where exact global clipping matters, use the ordinary ``loss.backward(); clip_grad_norm_(...);
optimizer.step()`` loop (the masked optimizers are the same objects either way).
"""

from __future__ import annotations

import math

import torch

from wagle.errors import UserError
from wagle.validation import check_number

from .masked import MaskedOptimizer


class NonFiniteGradientError(FloatingPointError):
    """A parameter's gradient held NaN/Inf when it was due to step; it was not stepped."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"gradient of {name!r} is not finite (NaN/Inf); that parameter was not stepped")


class StepInBackward:
    """Attach a masked optimizer to its parameters' post-accumulate-grad hooks.

    Usage::

        optimizer = MaskedAdamW(model.named_parameters(), mask, lr=1e-5, state_layout="compact")
        hooks = StepInBackward(optimizer, accumulation_steps=4, clip_norm_per_param=1.0)
        for i, batch in enumerate(batches):
            (loss_fn(model, batch) / 4).backward()      # steps happen inside backward every 4th batch
            if (i + 1) % 4 == 0:
                scheduler.step()
        hooks.remove()

    Args:
        optimizer: a :class:`~wagle.optim.MaskedAdamW` or :class:`~wagle.optim.MaskedSGD`.
        accumulation_steps: micro-batches per optimizer step (scale the loss by ``1/accumulation_steps``
            for a mean, as with ordinary accumulation).
        clip_norm_per_param: if given, clip each parameter's gradient to this L2 norm before its step
            (see the module docstring); ``last_norms`` then holds the pre-clip norms of the last step
            and :meth:`global_norm` their combined norm (for logging).
        check_finite: raise :class:`NonFiniteGradientError` out of ``backward()`` instead of stepping a
            parameter whose (accumulated) gradient holds NaN/Inf in the entries the optimizer uses.
            Parameters stepped earlier in the same backward pass keep their update.

    Each parameter's step is one kernel launch (or one torch-path update). Call the LR scheduler after
    each full accumulation cycle. Use as a context manager or call :meth:`remove` to detach.
    """

    def __init__(
        self,
        optimizer: MaskedOptimizer,
        accumulation_steps: int = 1,
        clip_norm_per_param: float | None = None,
        check_finite: bool = True,
    ):
        if not isinstance(optimizer, MaskedOptimizer):
            raise TypeError(
                f"optimizer: expected a wagle MaskedAdamW/MaskedSGD, got {type(optimizer).__name__}"
            )
        check_number("accumulation_steps", accumulation_steps, low=1, integer=True)
        if clip_norm_per_param is not None and not (
            clip_norm_per_param > 0 and math.isfinite(clip_norm_per_param)
        ):
            raise UserError(f"clip_norm_per_param: must be a finite number > 0, got {clip_norm_per_param!r}")
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.clip_norm_per_param = clip_norm_per_param
        self.check_finite = check_finite
        self.last_norms: dict[str, torch.Tensor] = {}
        self._counts: dict[int, int] = {}
        self._partial: dict[int, torch.Tensor] = {}
        self._handles = []
        for param, _ in optimizer.named_plans():
            if param.requires_grad:
                self._handles.append(param.register_post_accumulate_grad_hook(self._hook))

    # ---- the hook -----------------------------------------------------------------------------
    @torch.no_grad()
    def _hook(self, param: torch.Tensor) -> None:
        optimizer = self.optimizer
        plan = optimizer.plan(param)
        if optimizer.skips(plan):
            param.grad = None
            return
        grad = param.grad
        optimizer.check_grad(plan, param, grad)
        key = id(param)
        count = self._counts.get(key, 0) + 1
        if count < self.accumulation_steps:
            self._counts[key] = count
            if plan.masked:  # keep the selected entries only, free the full gradient
                part = torch.masked_select(grad.reshape(-1), plan.selected_flat(grad.device))
                partial = self._partial.get(key)
                if partial is None:
                    self._partial[key] = part
                else:
                    partial.add_(part)
                param.grad = None
            return  # dense: autograd keeps accumulating into .grad
        self._counts[key] = 0
        partial = self._partial.pop(key, None)
        selected = plan.selected_flat(grad.device) if plan.masked else None
        if partial is not None:
            flat = grad.reshape(-1)
            if not grad.is_contiguous():
                grad = grad.contiguous()
                flat = grad.view(-1)
            flat.masked_scatter_(selected, partial.add_(torch.masked_select(flat, selected)))
        norm = None
        if self.clip_norm_per_param is not None or self.check_finite:
            used = torch.masked_select(grad.reshape(-1), selected) if selected is not None else grad
            norm = torch.linalg.vector_norm(used.float(), 2.0)
        if self.check_finite and not bool(torch.isfinite(norm)):
            param.grad = None
            raise NonFiniteGradientError(plan.name)
        if self.clip_norm_per_param is not None:
            self.last_norms[plan.name] = norm
            coef = torch.clamp(self.clip_norm_per_param / (norm + 1e-6), max=1.0)
            grad.mul_(coef)
        optimizer.step_param(param, grad)
        optimizer._opt_called = True  # LR schedulers check that the optimizer has stepped
        param.grad = None

    # ---- helpers ------------------------------------------------------------------------------
    def global_norm(self) -> float:
        """Combined L2 norm of the pre-clip norms in ``last_norms`` (logging only; needs clipping on)."""
        if not self.last_norms:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack([n.cpu() for n in self.last_norms.values()]), 2.0))

    def reset(self) -> None:
        """Drop partially accumulated gradients and restart every accumulation count."""
        self._counts.clear()
        self._partial.clear()

    def partial_nbytes(self) -> int:
        """Bytes held by compact partial gradients between steps."""
        return sum(t.numel() * t.element_size() for t in self._partial.values())

    def remove(self) -> None:
        """Detach the hooks and drop partial gradients."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.reset()

    def __enter__(self) -> StepInBackward:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
