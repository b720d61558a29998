"""Gradient-norm clipping on FSDP2 (DTensor) gradients that equals one device's bit for bit.

``torch.nn.utils.clip_grad_norm_`` on DTensor gradients adds per-rank partial sums of squares, so
its total norm can differ from one device's in the last bit (it does at world size 3), which changes
every clipped weight. :func:`clip_grad_norm_` computes each parameter's norm on its full gradient
(``full_tensor()``: one all-gather per parameter, one parameter at a time), combines the norms as
torch does (``vector_norm`` of the stacked norms, grouped by device and dtype), and scales each rank's
local shard by ``min(1, max_norm / (total + 1e-6))``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.utils._foreach_utils import _device_has_foreach_support

from .attribution import is_dtensor


def _norm(full: torch.Tensor, norm_type: float) -> torch.Tensor:
    # torch's get_total_norm: the foreach kernel where the device has one, vector_norm otherwise
    if _device_has_foreach_support(full.device) and full.device.type != "cpu":
        return torch._foreach_norm([full], norm_type)[0]
    return torch.linalg.vector_norm(full, norm_type)


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0
) -> torch.Tensor:
    """Clip the gradients of ``parameters`` (DTensor or plain) to a total ``norm_type`` norm of
    ``max_norm``, as ``torch.nn.utils.clip_grad_norm_`` does on one device; returns the total norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norm_type = float(norm_type)
    groups: dict[tuple, list[torch.Tensor]] = {}
    for grad in grads:
        local = grad.to_local() if is_dtensor(grad) else grad
        groups.setdefault((local.device, grad.dtype), []).append(grad)
    first = grads[0].to_local().device if is_dtensor(grads[0]) else grads[0].device
    norms = []
    for members in groups.values():
        for grad in members:
            full = grad.full_tensor() if is_dtensor(grad) else grad
            norms.append(_norm(full, norm_type).to(first))
            del full
    total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for (device, _), members in groups.items():
        scale = coef.to(device)
        for grad in members:
            (grad.to_local() if is_dtensor(grad) else grad).mul_(scale)
    return total
