"""Masked AdamW: one fused pass that updates only the weights a bit-packed mask selects.

For a selected weight, with ``t`` the step count, the update is ``torch.optim.AdamW``'s (same operation
order as its single-tensor path, fp32 math whatever the storage dtypes)::

    p <- p * (1 - lr * wd)                                    decoupled weight decay
    m <- m + (1 - beta1) * (g - m)                            m.lerp_(g, 1 - beta1)
    v <- v * beta2 + ((1 - beta2) * g) * g                    v.mul_(beta2).addcmul_(g, g, 1 - beta2)
    denom <- sqrt(v) / sqrt(1 - beta2^t) + eps
    p <- p + ((-lr / (1 - beta1^t)) * m) / denom              p.addcdiv_(m, denom, value=-step_size)

(``lerp`` with a weight >= 0.5 uses torch's other form, ``m <- g - (g - m) * (1 - w)``.) The scalars
(``1 - lr*wd``, ``1 - beta1``, ``1 - beta2``, ``-lr/(1 - beta1^t)``, ``sqrt(1 - beta2^t)``) are computed
on the host in float64 exactly as torch does and passed to the kernel as fp32 arguments.

Unselected weights keep their exact bits and own no state. With the *compact* state layout the moments
hold only the selected weights, in flat order: the state index of a selected element ``i`` of block
``b = i // BLOCK`` is ``prefix[b] + #{selected j : b * BLOCK <= j < i}``, the exclusive block prefix
(:func:`wagle_kernels.mask_bits.block_prefix`, derived once from the static mask, 8 bytes per BLOCK
weights) plus an in-block ``cumsum`` of the mask bits.

``decay_all`` (the reference implementation's procedure, for comparison): every weight is updated with
the gradient zeroed where the mask is 0 (``grad * mask`` then plain AdamW), so weight decay and the
moments still move unselected weights; dense state only.

Memory traffic per weight of a block that holds at least one selected weight (the kernel skips blocks
without one after reading their mask bits):

* dense state: read p, g, m, v; write p, m, v (all elements of the block, vectorised; unselected
  elements are written back with the bits they were read with): ``2 * 2 + 4 * 4 + 2 + 2 * 4`` B for
  bf16 params and fp32 state (the ``22 B/weight`` of a plain fused AdamW) + 1 bit of mask;
* compact state: read p, g; write p; moments read and written for the selected weights only:
  ``3 * 2 + ratio * 16`` B for bf16 params and fp32 state + 1 bit of mask.

Launches (:mod:`wagle_kernels.multi_tensor`, shared with masked SGD): tensors are grouped
``MAX_TENSORS_PER_LAUNCH`` (16) per launch, largest first; the kernel here is only the elementwise
update :func:`adamw_update`. One step over ``T`` same-dtype tensors is ``ceil(T / 16)`` launches
(Llama-2-7B: 291 tensors -> 19).
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

DENSE_WHERE_RATIO = 0.25  # torch path, dense state: above this density update all and select, else gather


@dataclass(frozen=True)
class AdamWScalars:
    """One step's scalars for one tensor, computed on the host in float64 as torch.optim.AdamW does.

    ``decay = 1 - lr*wd``, ``one_minus_beta1 = 1 - beta1`` (the lerp weight), ``one_minus_beta2``,
    ``neg_step_size = -lr / (1 - beta1^t)``, ``bc2_sqrt = (1 - beta2^t) ** 0.5``.
    """

    lr: float
    weight_decay: float
    decay: float
    beta1: float
    beta2: float
    one_minus_beta1: float
    one_minus_beta2: float
    neg_step_size: float
    bc2_sqrt: float
    eps: float

    @classmethod
    def make(
        cls, lr: float, betas: tuple[float, float], eps: float, weight_decay: float, step: int
    ) -> AdamWScalars:
        """Scalars of step ``step`` (1-based) for the given hyperparameters."""
        lr, eps, weight_decay = float(lr), float(eps), float(weight_decay)
        beta1, beta2 = float(betas[0]), float(betas[1])
        if step < 1:
            raise ValueError(f"step: must be >= 1, got {step}")
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        return cls(
            lr=lr,
            weight_decay=weight_decay,
            decay=1 - lr * weight_decay,
            beta1=beta1,
            beta2=beta2,
            one_minus_beta1=1 - beta1,
            one_minus_beta2=1 - beta2,
            neg_step_size=-(lr / bias_correction1),
            bc2_sqrt=bias_correction2**0.5,
            eps=eps,
        )

    def group_key(self) -> tuple[float, ...]:
        """The scalars one launch shares (everything but the per-tensor bias corrections)."""
        return (self.decay, self.beta2, self.one_minus_beta1, self.one_minus_beta2, self.eps)


# ---------------------------------------------------------------------------------------------------
# torch reference path
# ---------------------------------------------------------------------------------------------------


def adamw_update_(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, s: AdamWScalars
) -> None:
    """One AdamW update in place on same-shaped tensors, with torch.optim.AdamW's exact operations
    (its single-tensor path): on fp32 tensors it is that path."""
    if s.weight_decay != 0:
        param.mul_(s.decay)
    exp_avg.lerp_(grad, s.one_minus_beta1)
    exp_avg_sq.mul_(s.beta2).addcmul_(grad, grad, value=s.one_minus_beta2)
    denom = (exp_avg_sq.sqrt() / s.bc2_sqrt).add_(s.eps)
    param.addcdiv_(exp_avg, denom, value=s.neg_step_size)


def masked_adamw_step_torch(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    selected: torch.Tensor | None,
    s: AdamWScalars,
    *,
    compact: bool = False,
    decay_all: bool = False,
    index: torch.Tensor | None = None,
) -> None:
    """Reference masked AdamW step, in place, fp32 math (the semantics of the fused kernel).

    Args:
        param, grad: the parameter (contiguous) and its gradient (same shape).
        exp_avg, exp_avg_sq: the moments, param-shaped (dense) or one entry per selected weight in
            flat order (``compact``); any float dtype.
        selected: flat bool mask of ``param.numel()`` elements; None updates every weight.
        compact: the moments are compact.
        decay_all: the reference procedure (``grad * mask``, then AdamW on every weight); dense only.
        index: the flat positions of the selected weights (int32/int64, ``selected.nonzero()``), if
            the caller keeps them; otherwise they are computed (or, for dense state above 25% density,
            every weight is updated with a zeroed gradient and the unselected ones are put back).
    """
    math = math_dtype(param)
    p_flat, g_flat = param.view(-1), grad.reshape(-1)
    m_flat, v_flat = exp_avg.view(-1), exp_avg_sq.view(-1)
    if decay_all:
        if compact:
            raise ValueError("decay_all: needs the dense state layout")
        if selected is not None:
            g_flat = g_flat * selected
        selected = None
    if selected is None:
        p, g, m, v = (t.to(math) for t in (p_flat, g_flat, m_flat, v_flat))
        adamw_update_(p, g, m, v, s)
        for dst, src in ((p_flat, p), (m_flat, m), (v_flat, v)):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
        return
    dense_where = index is None and not compact and selected.numel() > 0
    if dense_where and selected.sum() > DENSE_WHERE_RATIO * selected.numel():
        # dense state, many selected: update every element with the gradient zeroed where unselected
        # (unselected moments stay exactly 0) and keep the old bits of unselected weights
        p = p_flat.to(math).clone()
        g = torch.where(selected, g_flat.to(math), 0.0)
        m, v = m_flat.to(math), v_flat.to(math)
        adamw_update_(p, g, m, v, s)
        p_flat.copy_(torch.where(selected, p.to(p_flat.dtype), p_flat))
        for dst, src in ((m_flat, m), (v_flat, v)):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
        return
    if index is None:
        index = selected.nonzero().squeeze(1)
    p = p_flat.index_select(0, index).to(math)
    g = g_flat.index_select(0, index).to(math)
    if compact:
        m, v = m_flat.to(math), v_flat.to(math)
    else:
        m, v = m_flat.index_select(0, index).to(math), v_flat.index_select(0, index).to(math)
    adamw_update_(p, g, m, v, s)
    p_flat.index_put_((index,), p.to(p_flat.dtype))
    if compact:
        for dst, src in ((m_flat, m), (v_flat, v)):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
    else:
        m_flat.index_put_((index,), m.to(m_flat.dtype))
        v_flat.index_put_((index,), v.to(v_flat.dtype))


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def adamw_update(p, g, m, v, neg_step_size, bc2_sqrt, SHARED, FLAGS: tl.constexpr):
        """The module docstring's formula on fp32 blocks; SHARED = (decay, beta2, 1 - beta1, 1 - beta2,
        eps), FLAGS = (LERP_SMALL,): torch's lerp form for a weight below 0.5."""
        decay = SHARED[0]
        beta2 = SHARED[1]
        w1 = SHARED[2]
        omb2 = SHARED[3]
        eps = SHARED[4]
        p = p * decay
        if FLAGS[0]:
            m = m + w1 * (g - m)
        else:
            m = g - (g - m) * (1.0 - w1)
        v = v * beta2 + (omb2 * g) * g
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p + tl.div_rn(neg_step_size * m, denom)
        return p, m, v


def masked_adamw_step_triton(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    packed: Sequence[torch.Tensor] | None,
    prefixes: Sequence[torch.Tensor] | None,
    scalars: Sequence[AdamWScalars],
    *,
    decay_all: bool = False,
    max_tensors: int = MAX_TENSORS_PER_LAUNCH,
    num_warps: int = 8,
) -> int:
    """Fused masked AdamW step over several tensors, in place; returns the number of launches.

    Args:
        params: contiguous parameters on one device (any float dtypes; fp32 math).
        grads: their gradients (made contiguous if needed).
        exp_avgs, exp_avg_sqs: the moments, param-shaped or compact (see ``prefixes``).
        packed: each tensor's mask bits (uint8, ``ceil(numel / 8)``), or None to update every weight.
        prefixes: each tensor's compact block prefix (int64, ``block_prefix(bits, numel)``) when the
            moments are compact, else None.
        scalars: per-tensor :class:`AdamWScalars`; all must share :meth:`AdamWScalars.group_key`.
        decay_all: the reference procedure (needs ``packed``, dense moments).
        max_tensors: tensors per launch (a power of two).
    """
    if not HAS_TRITON:  # pragma: no cover - guarded by the optimizer
        raise RuntimeError("masked_adamw_step_triton: triton is not installed")
    count = len(params)
    for name, seq in (
        ("grads", grads),
        ("exp_avgs", exp_avgs),
        ("exp_avg_sqs", exp_avg_sqs),
        ("scalars", scalars),
    ):
        if len(seq) != count:
            raise ValueError(f"{name}: expected {count} entries, got {len(seq)}")
    if decay_all and (packed is None or prefixes is not None):
        raise ValueError("decay_all: needs mask bits and dense moments")
    if count and any(s.group_key() != scalars[0].group_key() for s in scalars):
        raise ValueError("scalars: tensors of one launch must share lr, weight decay, betas and eps")
    if not count:
        return 0
    first = scalars[0]
    return launch_masked_update(
        adamw_update,
        params,
        grads,
        (exp_avgs, exp_avg_sqs),
        packed,
        prefixes,
        ([s.neg_step_size for s in scalars], [s.bc2_sqrt for s in scalars]),
        (first.decay, first.beta2, first.one_minus_beta1, first.one_minus_beta2, first.eps),
        (abs(first.one_minus_beta1) < 0.5,),
        update_all=decay_all,
        max_tensors=max_tensors,
        num_warps=num_warps,
    )


VARIANTS = (  # (masked, compact, decay_all): every layout the optimizer launches
    (True, True, False),
    (True, False, False),
    (True, False, True),
    (False, False, False),
)


def compile_variants(
    num: int = MAX_TENSORS_PER_LAUNCH, dtype: str = "bf16", state: str = "fp32", index: str = "i32"
):
    """``(label, kernel, signature, constexprs, attrs)`` for ahead-of-time compile checks of every variant
    the optimizer launches (``index="i64"``: tensors of 2^31 or more weights; ``attrs``: the JIT's
    specialisation of 16-byte aligned pointers and numels that are multiples of 16)."""
    signature = compile_signature(num, 5, dtype, state, index)
    for masked, compact, decay_all in VARIANTS:
        yield (
            f"masked adamw x{num} {dtype}/{state} n:{index} masked={masked} compact={compact} "
            f"decay_all={decay_all}",
            masked_multi_tensor_kernel,
            signature,
            compile_constexprs(adamw_update, (True,), 2, num, masked, compact, decay_all),
            aligned_attrs(signature),
        )
