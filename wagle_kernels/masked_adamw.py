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
from collections.abc import Sequence
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

    from .mask_bits import block_elements

    @triton.jit
    def _adamw_block(
        p_ptrs, g_ptrs, m_ptrs, v_ptrs, selected, decay, beta1, beta2, step_size, inv_sqrt_bc2, eps
    ):
        """Load, update (formula in the module docstring, fp32) and store one block of selected elements."""
        p = tl.load(p_ptrs, mask=selected, other=0.0).to(tl.float32)
        g = tl.load(g_ptrs, mask=selected, other=0.0).to(tl.float32)
        m = tl.load(m_ptrs, mask=selected, other=0.0).to(tl.float32)
        v = tl.load(v_ptrs, mask=selected, other=0.0).to(tl.float32)
        p = p * decay
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * g * g
        denom = tl.sqrt_rn(v) * inv_sqrt_bc2 + eps
        p = p - step_size * tl.div_rn(m, denom)
        tl.store(p_ptrs, p.to(p_ptrs.dtype.element_ty), mask=selected)
        tl.store(m_ptrs, m.to(m_ptrs.dtype.element_ty), mask=selected)
        tl.store(v_ptrs, v.to(v_ptrs.dtype.element_ty), mask=selected)

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
        offs, selected, state = block_elements(
            bits_ptr, prefix_ptr, tl.program_id(0), n, MASKED=MASKED, COMPACT=COMPACT, BLOCK=BLOCK
        )
        _adamw_block(
            p_ptr + offs,
            g_ptr + offs,
            m_ptr + state,
            v_ptr + state,
            selected,
            decay,
            beta1,
            beta2,
            step_size,
            inv_sqrt_bc2,
            eps,
        )


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


if HAS_TRITON:

    @triton.jit(do_not_specialize=["decay", "beta1", "beta2", "eps"])
    def _masked_adamw_multi_kernel(
        p_base,
        g_base,
        m_base,
        v_base,
        bits_base,
        prefix_base,
        offsets_ptr,
        numel_ptr,
        block_owner_ptr,
        block_index_ptr,
        step_size_ptr,
        inv_sqrt_bc2_ptr,
        num_tensors,
        decay,
        beta1,
        beta2,
        eps,
        MASKED: tl.constexpr,
        COMPACT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """The kernel above over many tensors in one launch (see :mod:`wagle_kernels.multi_tensor`).

        ``offsets`` is an int64 [6, num_tensors] table: element offsets of p, g, m, v, mask bytes and
        compact prefix of each tensor from their base pointers; step size and 1/sqrt(bias correction 2)
        are per tensor (each parameter has its own step count).
        """
        pid = tl.program_id(0)
        t = tl.load(block_owner_ptr + pid)
        offs, selected, state = block_elements(
            bits_base + tl.load(offsets_ptr + 4 * num_tensors + t),
            prefix_base + tl.load(offsets_ptr + 5 * num_tensors + t),
            tl.load(block_index_ptr + pid),
            tl.load(numel_ptr + t),
            MASKED=MASKED,
            COMPACT=COMPACT,
            BLOCK=BLOCK,
        )
        _adamw_block(
            p_base + tl.load(offsets_ptr + t) + offs,
            g_base + tl.load(offsets_ptr + num_tensors + t) + offs,
            m_base + tl.load(offsets_ptr + 2 * num_tensors + t) + state,
            v_base + tl.load(offsets_ptr + 3 * num_tensors + t) + state,
            selected,
            decay,
            beta1,
            beta2,
            tl.load(step_size_ptr + t),
            tl.load(inv_sqrt_bc2_ptr + t),
            eps,
        )


def masked_adamw_multi_step_triton(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    packed: Sequence[torch.Tensor] | None,
    prefixes: Sequence[torch.Tensor] | None,
    scalars: Sequence[AdamWScalars],
    *,
    num_warps: int = 8,
) -> bool:
    """One launch for many same-dtype tensors (same decay/betas/eps). Returns False when the tensors
    cannot share base pointers (the caller then launches per tensor)."""
    from .multi_tensor import address_table, block_tables

    keep = [i for i, p in enumerate(params) if p.numel() > 0]
    if not keep:
        return True
    pick = lambda seq: [seq[i] for i in keep]  # noqa: E731
    params, grads, exp_avgs, exp_avg_sqs, scalars = map(pick, (params, grads, exp_avgs, exp_avg_sqs, scalars))
    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    groups = [params, grads, exp_avgs, exp_avg_sqs]
    groups.append(pick(packed) if packed is not None else params)
    groups.append(pick(prefixes) if prefixes is not None else params)
    tables = [address_table(g) for g in groups]
    if any(t is None for t in tables):
        return False
    device = params[0].device
    first = scalars[0]
    offsets = torch.tensor([t[1] for t in tables], dtype=torch.int64, device=device)
    numels = torch.tensor([p.numel() for p in params], dtype=torch.int64, device=device)
    owners, indices = block_tables([p.numel() for p in params], STATE_BLOCK, device)
    step_sizes = torch.tensor([s.step_size for s in scalars], dtype=torch.float32, device=device)
    inv_sqrt = torch.tensor([s.inv_sqrt_bc2 for s in scalars], dtype=torch.float32, device=device)
    _masked_adamw_multi_kernel[(owners.numel(),)](
        *(t[0] for t in tables),
        offsets,
        numels,
        owners,
        indices,
        step_sizes,
        inv_sqrt,
        len(params),
        first.decay,
        first.beta1,
        first.beta2,
        first.eps,
        MASKED=packed is not None,
        COMPACT=prefixes is not None,
        BLOCK=STATE_BLOCK,
        num_warps=num_warps,
        **launch_options(),
    )
    return True
