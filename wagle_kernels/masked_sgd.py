"""Masked SGD (momentum, dampening, Nesterov, coupled weight decay) on bit-packed masks.

For a selected weight, ``torch.optim.SGD``'s update in its operation order (fp32 math)::

    d <- g + wd * p                                      (only when wd != 0)
    b <- d                                               first step with momentum
    b <- b * momentum + (1 - dampening) * d              later steps
    d <- d + momentum * b   (Nesterov)    or    d <- b   (momentum > 0)
    p <- p + (-lr) * d

Unselected weights keep their exact bits and own no momentum buffer; the compact layout stores the
buffer for selected weights only, indexed like :mod:`wagle_kernels.masked_adamw`'s compact moments.
Launches: :mod:`wagle_kernels.multi_tensor`; the kernel here is only the elementwise update
:func:`sgd_update`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._runtime import HAS_TRITON, aligned_attrs
from .multi_tensor import (
    MAX_TENSORS_PER_LAUNCH,
    compile_constexprs,
    compile_signature,
    launch_masked_update,
    masked_multi_tensor_kernel,
    math_dtype,
)


@dataclass(frozen=True)
class SGDScalars:
    """Hyperparameters of one SGD step (one param group)."""

    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool


# ---------------------------------------------------------------------------------------------------
# torch reference path
# ---------------------------------------------------------------------------------------------------


def sgd_update_(
    param: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor | None, s: SGDScalars, *, first: bool
) -> None:
    """One SGD update in place with torch.optim.SGD's operations (its single-tensor path). ``buf`` is the
    momentum buffer (None without momentum); on the ``first`` step it is overwritten with ``d``."""
    d = grad
    if s.weight_decay != 0:
        d = d.add(param, alpha=s.weight_decay)
    if s.momentum != 0:
        if first:
            buf.copy_(d)
        else:
            buf.mul_(s.momentum).add_(d, alpha=1 - s.dampening)
        d = d.add(buf, alpha=s.momentum) if s.nesterov else buf
    param.add_(d, alpha=-s.lr)


def masked_sgd_step_torch(
    param: torch.Tensor,
    grad: torch.Tensor,
    buf: torch.Tensor | None,
    selected: torch.Tensor | None,
    s: SGDScalars,
    *,
    first: bool,
    compact: bool = False,
    index: torch.Tensor | None = None,
) -> None:
    """Reference masked SGD step, in place, fp32 math.

    ``selected``: flat bool mask (None: every weight); ``buf``: the momentum buffer (None when momentum
    is 0), param-shaped or, with ``compact``, one entry per selected weight in flat order; ``index``:
    the selected flat positions if the caller keeps them (else ``selected.nonzero()``).
    """
    math = math_dtype(param)
    p_flat, g_flat = param.view(-1), grad.reshape(-1)
    b_flat = buf.view(-1) if buf is not None else None
    if selected is None:
        p, g = p_flat.to(math), g_flat.to(math)
        b = b_flat.to(math) if b_flat is not None else None
        sgd_update_(p, g, b, s, first=first)
        for dst, src in ((p_flat, p), (b_flat, b)):
            if dst is not None and dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
        return
    if index is None:
        index = selected.nonzero().squeeze(1)
    p = p_flat.index_select(0, index).to(math)
    g = g_flat.index_select(0, index).to(math)
    b = None
    if b_flat is not None:
        b = b_flat.to(math) if compact else b_flat.index_select(0, index).to(math)
    sgd_update_(p, g, b, s, first=first)
    p_flat.index_put_((index,), p.to(p_flat.dtype))
    if b is not None:
        if compact:
            if b.data_ptr() != b_flat.data_ptr():
                b_flat.copy_(b)
        else:
            b_flat.index_put_((index,), b.to(b_flat.dtype))


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def sgd_update(p, g, b, unused, first, unused_b, SHARED, FLAGS: tl.constexpr):
        """The module docstring's formula on fp32 blocks; ``first`` = 1.0 on a tensor's first momentum
        step; SHARED = (-lr, momentum, 1 - dampening, weight_decay); FLAGS = (HAS_WD, HAS_MOMENTUM,
        NESTEROV)."""
        neg_lr = SHARED[0]
        momentum = SHARED[1]
        one_minus_dampening = SHARED[2]
        weight_decay = SHARED[3]
        d = g
        if FLAGS[0]:
            d = d + weight_decay * p
        if FLAGS[1]:
            new_b = d
            if first == 0.0:
                new_b = b * momentum + one_minus_dampening * d
            b = new_b
            if FLAGS[2]:
                d = d + momentum * b
            else:
                d = b
        p = p + neg_lr * d
        return p, b, unused


def masked_sgd_step_triton(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    bufs: Sequence[torch.Tensor] | None,
    packed: Sequence[torch.Tensor] | None,
    prefixes: Sequence[torch.Tensor] | None,
    s: SGDScalars,
    *,
    first: Sequence[bool] | None = None,
    max_tensors: int = MAX_TENSORS_PER_LAUNCH,
    num_warps: int = 8,
) -> int:
    """Fused masked SGD step over several tensors, in place; returns the number of launches.

    ``bufs``: momentum buffers (None when momentum is 0), param-shaped or compact (then ``prefixes``
    gives each tensor's compact block prefix); ``packed``: mask bits (None: every weight); ``first``:
    per tensor, whether this is its first momentum step.
    """
    if not HAS_TRITON:  # pragma: no cover - guarded by the optimizer
        raise RuntimeError("masked_sgd_step_triton: triton is not installed")
    has_momentum = s.momentum != 0
    if has_momentum and bufs is None:
        raise ValueError("bufs: momentum > 0 needs momentum buffers")
    first = list(first) if first is not None else [False] * len(params)
    return launch_masked_update(
        sgd_update,
        params,
        grads,
        (bufs,) if has_momentum else (),
        packed,
        prefixes if has_momentum else None,
        ([float(f) for f in first], [0.0] * len(params)),
        (-s.lr, s.momentum, 1 - s.dampening, s.weight_decay),
        (s.weight_decay != 0, has_momentum, s.nesterov),
        max_tensors=max_tensors,
        num_warps=num_warps,
    )


VARIANTS = (  # (compact, momentum, nesterov), masked, with weight decay
    (True, True, False),
    (False, True, True),
    (True, False, False),
)


def compile_variants(
    num: int = MAX_TENSORS_PER_LAUNCH, dtype: str = "bf16", state: str = "fp32", index: str = "i32"
):
    """``(label, kernel, signature, constexprs, attrs)`` for ahead-of-time compile checks (as
    :func:`wagle_kernels.masked_adamw.compile_variants`)."""
    signature = compile_signature(num, 4, dtype, state, index)
    for compact, momentum, nesterov in VARIANTS:
        yield (
            f"masked sgd x{num} {dtype}/{state} n:{index} compact={compact} momentum={momentum} "
            f"nesterov={nesterov}",
            masked_multi_tensor_kernel,
            signature,
            compile_constexprs(
                sgd_update, (True, momentum, nesterov), int(momentum), num, True, compact and momentum
            ),
            aligned_attrs(signature),
        )
