"""Gradient clipping with a weight mask: which gradient entries the global norm is taken over.

Two semantics (``clip_mode``), shared by ``wagle.unlearn`` and ``wagle.integrations.WagleTrainerMixin``:

* ``"mask_then_clip"`` (default): the unselected entries of every gradient are zeroed first,
  ``g <- g * m``, so the global norm ``||g * m||_2`` covers exactly the entries the update uses, and
  ``g <- g * min(1, max_norm / (||g * m||_2 + 1e-6))``. A run's clipping then depends on the mask only
  through the weights that move; ``StepInBackward(clip_norm_per_param=...)`` measures the same
  (selected) entries, per parameter.
* ``"clip_then_mask"``: the reference WAGLE implementation's order: clip the full gradients of every
  parameter that has one (``||g||_2`` includes unselected entries, and, in the Trainer integration and
  ``wagle.unlearn``, the gradients of fully unselected trainable tensors, which then keep their
  gradients), then update only the selected entries.

The coefficient is ``torch.nn.utils.clip_grad_norm_``'s (``max_norm / (norm + 1e-6)``, capped at 1).
"""

from __future__ import annotations

import torch

from wagle.errors import UserError

from .masked import MaskedOptimizer

CLIP_MODES = ("mask_then_clip", "clip_then_mask")


def check_clip_mode(mode: str, what: str = "clip_mode") -> str:
    """Return ``mode`` if it is one of :data:`CLIP_MODES`; otherwise raise a ValueError naming ``what``."""
    if mode not in CLIP_MODES:
        raise UserError(f"{what}: expected one of {CLIP_MODES}, got {mode!r}")
    return mode


@torch.no_grad()
def mask_gradients_(optimizer: MaskedOptimizer) -> int:
    """Zero the unselected entries of the gradients of ``optimizer``'s masked parameters, ``g <- g * m``
    (in place); gradients of parameters the optimizer never updates (frozen, or no selected weight) are
    zeroed entirely. Returns the number of gradients changed."""
    changed = 0
    for param, plan in optimizer.named_plans():
        grad = param.grad
        if grad is None or plan.kind == "dense" or (plan.masked and plan.selected == plan.numel):
            continue
        if optimizer.skips(plan):
            grad.zero_()
        else:
            grad.masked_fill_(~plan.selected_flat(grad.device).view(grad.shape), 0)
        changed += 1
    return changed


def clip_masked_grad_norm_(
    optimizer: MaskedOptimizer, max_norm: float, mode: str = "mask_then_clip"
) -> torch.Tensor:
    """Clip the gradients of ``optimizer``'s parameters to global L2 norm ``max_norm`` under ``mode``
    (see the module docstring); returns the pre-clip norm (over the selected entries for
    ``"mask_then_clip"``, over the full gradients for ``"clip_then_mask"``)."""
    check_clip_mode(mode)
    if mode == "mask_then_clip":
        mask_gradients_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
