"""Masked AdamW: one fused pass that updates only the weights a bit-packed mask selects.

For a selected weight (torch.optim.AdamW's formula, fp32 math whatever the storage dtypes)::

    p <- p * (1 - lr * wd)                             (decoupled weight decay)
    m <- m + (1 - beta1) * (g - m)
    v <- beta2 * v + (1 - beta2) * g^2
    p <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Unselected weights are neither read for update nor written (bit-identical) and own no state. With
``COMPACT`` the moments hold only selected weights, addressed through :func:`compact_index`.
Bytes per selected weight: read p, g (2 x dtype), m, v (2 x state dtype), write p, m, v; plus the
mask bit for every weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._runtime import HAS_TRITON, launch_options
from .mask_bits import STATE_BLOCK


@dataclass(frozen=True)
class AdamWScalars:
    """Per-step scalars, computed on the host in float64."""

    decay: float  # 1 - lr * wd
    beta1: float
    beta2: float
    step_size: float  # lr / (1 - beta1^t)
    inv_sqrt_bc2: float  # 1 / sqrt(1 - beta2^t)
    eps: float

    @classmethod
    def make(cls, lr: float, betas: tuple[float, float], eps: float, weight_decay: float, step: int):
        beta1, beta2 = betas
        return cls(
            decay=1.0 - lr * weight_decay,
            beta1=beta1,
            beta2=beta2,
            step_size=lr / (1.0 - beta1**step),
            inv_sqrt_bc2=1.0 / math.sqrt(1.0 - beta2**step),
            eps=eps,
        )


def adamw_update_torch(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, s: AdamWScalars
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The AdamW update on matching flat vectors in fp32; returns (param, exp_avg, exp_avg_sq) in fp32."""
    p, g = param.float(), grad.float()
    m, v = exp_avg.float(), exp_avg_sq.float()
    p = p * s.decay
    m = m + (1.0 - s.beta1) * (g - m)
    v = v * s.beta2 + (1.0 - s.beta2) * g * g
    denom = v.sqrt() * s.inv_sqrt_bc2 + s.eps
    return p - s.step_size * m / denom, m, v


def masked_adamw_step_torch(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    selected: torch.Tensor | None,
    s: AdamWScalars,
    *,
    compact: bool = False,
) -> None:
    """Reference step, in place. ``selected`` is a flat bool mask (None: every weight); the state is
    dense (param-shaped) or, with ``compact``, one entry per selected weight in flat order."""
    p_flat, g_flat = param.view(-1), grad.reshape(-1)
    m_flat, v_flat = exp_avg.view(-1), exp_avg_sq.view(-1)
    if selected is None:
        p, m, v = adamw_update_torch(p_flat, g_flat, m_flat, v_flat, s)
        p_flat.copy_(p), m_flat.copy_(m), v_flat.copy_(v)
        return
    if not compact:  # update everything, keep the old values where unselected (no gathers)
        p, m, v = adamw_update_torch(p_flat, g_flat, m_flat, v_flat, s)
        p_flat.copy_(torch.where(selected, p.to(p_flat.dtype), p_flat))
        m_flat.copy_(torch.where(selected, m.to(m_flat.dtype), m_flat))
        v_flat.copy_(torch.where(selected, v.to(v_flat.dtype), v_flat))
        return
    p, m, v = adamw_update_torch(p_flat[selected], g_flat[selected], m_flat, v_flat, s)
    p_flat[selected] = p.to(p_flat.dtype)
    m_flat.copy_(m), v_flat.copy_(v)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .mask_bits import compact_index, load_mask_bits

    @triton.jit(do_not_specialize=["n", "decay", "beta1", "beta2", "step_size", "inv_sqrt_bc2", "eps"])
    def _masked_adamw_kernel(
        p_ptr,
        g_ptr,
        m_ptr,
        v_ptr,
        bits_ptr,
        prefix_ptr,
        n,
        decay,
        beta1,
        beta2,
        step_size,
        inv_sqrt_bc2,
        eps,
        MASKED: tl.constexpr,
        COMPACT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """AdamW on the selected elements of one BLOCK (formula in the module docstring)."""
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n
        if MASKED:
            selected = load_mask_bits(bits_ptr, offs, valid)
        else:
            selected = valid
        if COMPACT:
            state = compact_index(prefix_ptr, pid, selected)
        else:
            state = offs
        p = tl.load(p_ptr + offs, mask=selected, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=selected, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + state, mask=selected, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + state, mask=selected, other=0.0).to(tl.float32)
        p = p * decay
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * g * g
        denom = tl.sqrt_rn(v) * inv_sqrt_bc2 + eps
        p = p - step_size * tl.div_rn(m, denom)
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=selected)
        tl.store(m_ptr + state, m.to(m_ptr.dtype.element_ty), mask=selected)
        tl.store(v_ptr + state, v.to(v_ptr.dtype.element_ty), mask=selected)


def masked_adamw_step_triton(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    packed: torch.Tensor | None,
    prefix: torch.Tensor | None,
    s: AdamWScalars,
    *,
    num_warps: int = 8,
) -> None:
    """Fused step, in place, one launch. ``packed``: mask bits (None: every weight); ``prefix``: the
    compact-index metadata when the state is compact (None: dense state)."""
    n = param.numel()
    if n == 0:
        return
    grad = grad if grad.is_contiguous() else grad.contiguous()
    placeholder = exp_avg
    _masked_adamw_kernel[(triton.cdiv(n, STATE_BLOCK),)](
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        packed if packed is not None else placeholder,
        prefix if prefix is not None else placeholder,
        n,
        s.decay,
        s.beta1,
        s.beta2,
        s.step_size,
        s.inv_sqrt_bc2,
        s.eps,
        MASKED=packed is not None,
        COMPACT=prefix is not None,
        BLOCK=STATE_BLOCK,
        num_warps=num_warps,
        **launch_options(),
    )
