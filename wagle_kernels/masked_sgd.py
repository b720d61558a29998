"""Masked SGD (momentum, dampening, Nesterov, coupled weight decay) on bit-packed masks.

For a selected weight (torch.optim.SGD's formula, fp32 math)::

    d = g + wd * p
    b = d                                  on the first step (momentum > 0)
    b = momentum * b + (1 - dampening) * d  afterwards
    d = d + momentum * b  (Nesterov)   or   d = b
    p = p - lr * d

Unselected weights are untouched and own no momentum buffer; ``COMPACT`` stores the buffer only for
selected weights (see :mod:`wagle_kernels.mask_bits`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._runtime import HAS_TRITON, launch_options
from .mask_bits import STATE_BLOCK


@dataclass(frozen=True)
class SGDScalars:
    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool


def sgd_update_torch(param, grad, buf, s: SGDScalars, first: bool):
    """The SGD update on flat vectors in fp32; returns (param, momentum buffer or None)."""
    p, d = param.float(), grad.float()
    if s.weight_decay:
        d = d + s.weight_decay * p
    new_buf = None
    if s.momentum:
        new_buf = d if first else buf.float() * s.momentum + (1.0 - s.dampening) * d
        d = d + s.momentum * new_buf if s.nesterov else new_buf
    return p - s.lr * d, new_buf


def masked_sgd_step_torch(
    param, grad, buf, selected, s: SGDScalars, *, first: bool, compact: bool = False
) -> None:
    """Reference step, in place (``buf`` None when momentum is 0)."""
    p_flat, g_flat = param.view(-1), grad.reshape(-1)
    b_flat = buf.view(-1) if buf is not None else None
    if selected is None:
        p, b = sgd_update_torch(p_flat, g_flat, b_flat, s, first)
        p_flat.copy_(p)
        if b is not None:
            b_flat.copy_(b)
        return
    b_sel = None if b_flat is None else (b_flat if compact else b_flat[selected])
    p, b = sgd_update_torch(p_flat[selected], g_flat[selected], b_sel, s, first)
    p_flat[selected] = p.to(p_flat.dtype)
    if b is not None:
        if compact:
            b_flat.copy_(b)
        else:
            b_flat[selected] = b.to(b_flat.dtype)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .mask_bits import block_elements

    @triton.jit(do_not_specialize=["n", "lr", "momentum", "dampening", "weight_decay"])
    def _masked_sgd_kernel(
        p_ptr,
        g_ptr,
        b_ptr,
        bits_ptr,
        prefix_ptr,
        n,
        lr,
        momentum,
        dampening,
        weight_decay,
        MASKED: tl.constexpr,
        COMPACT: tl.constexpr,
        HAS_MOMENTUM: tl.constexpr,
        FIRST: tl.constexpr,
        NESTEROV: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """SGD on the selected elements of one BLOCK (formula in the module docstring)."""
        offs, selected, state = block_elements(
            bits_ptr,
            prefix_ptr,
            tl.program_id(0),
            n,
            MASKED=MASKED,
            COMPACT=COMPACT and HAS_MOMENTUM,
            BLOCK=BLOCK,
        )
        p = tl.load(p_ptr + offs, mask=selected, other=0.0).to(tl.float32)
        d = tl.load(g_ptr + offs, mask=selected, other=0.0).to(tl.float32)
        d = d + weight_decay * p
        if HAS_MOMENTUM:
            if FIRST:
                b = d
            else:
                b = tl.load(b_ptr + state, mask=selected, other=0.0).to(tl.float32)
                b = b * momentum + (1.0 - dampening) * d
            tl.store(b_ptr + state, b.to(b_ptr.dtype.element_ty), mask=selected)
            if NESTEROV:
                d = d + momentum * b
            else:
                d = b
        p = p - lr * d
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=selected)


def masked_sgd_step_triton(
    param, grad, buf, packed, prefix, s: SGDScalars, *, first: bool, num_warps: int = 8
):
    """Fused step, in place, one launch (``prefix`` given for a compact buffer)."""
    n = param.numel()
    if n == 0:
        return
    grad = grad if grad.is_contiguous() else grad.contiguous()
    placeholder = param
    _masked_sgd_kernel[(triton.cdiv(n, STATE_BLOCK),)](
        param,
        grad,
        buf if buf is not None else placeholder,
        packed if packed is not None else placeholder,
        prefix if prefix is not None else placeholder,
        n,
        s.lr,
        s.momentum,
        s.dampening,
        s.weight_decay,
        MASKED=packed is not None,
        COMPACT=prefix is not None,
        HAS_MOMENTUM=buf is not None,
        FIRST=first,
        NESTEROV=s.nesterov,
        BLOCK=STATE_BLOCK,
        num_warps=num_warps,
        **launch_options(),
    )
