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

Launches: tensors are grouped ``MAX_TENSORS_PER_LAUNCH`` (16) per launch, largest first; each tensor
is its own set of pointer arguments (Triton tuples: no pointer table in memory, so the kernel also runs
in the interpreter). The grid is (blocks of the launch's largest tensor, tensors): program ``(b, i)``
updates block ``b`` of tensor ``i`` and returns at once past that tensor's end. One step over ``T``
same-dtype tensors is ``ceil(T / 16)`` launches (Llama-2-7B: 291 tensors -> 19).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._runtime import HAS_TRITON, interpreter_enabled, launch_options
from .mask_bits import STATE_BLOCK

MAX_TENSORS_PER_LAUNCH = 16  # a power of two; tensors per launch are padded to a power of two
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


def math_dtype(param: torch.Tensor) -> torch.dtype:
    """The torch path computes in fp32, or fp64 for fp64 parameters (the kernel supports 16/32-bit)."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


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


# ---------------------------------------------------------------------------------------------------
# launch grouping (shared with masked_sgd)
# ---------------------------------------------------------------------------------------------------


def launch_chunks(numels: Sequence[int], max_tensors: int = MAX_TENSORS_PER_LAUNCH) -> list[list[int]]:
    """Indices of the non-empty tensors, largest first, ``max_tensors`` per launch.

    A launch's grid is ``(blocks of its largest tensor, tensors)``; programs past a smaller tensor's
    last block return at once, so grouping tensors of similar size keeps that waste small.
    """
    if max_tensors < 1 or max_tensors & (max_tensors - 1):
        raise ValueError(f"max_tensors: must be a power of two, got {max_tensors}")
    order = sorted((i for i, n in enumerate(numels) if n > 0), key=lambda i: -numels[i])
    return [order[k : k + max_tensors] for k in range(0, len(order), max_tensors)]


def padded_size(count: int) -> int:
    """Tensors per launch rounded up to a power of two (bounds the number of compiled variants)."""
    size = 1
    while size < count:
        size *= 2
    return size


def launch_grid(numels: Sequence[int], block: int = STATE_BLOCK) -> tuple[int, int]:
    """``(blocks of the largest tensor, number of tensors)``: program (b, i) updates block b of tensor i."""
    return (max((n + block - 1) // block for n in numels), len(numels))


def pad(values: Sequence, size: int, fill) -> tuple:
    """``values`` padded with ``fill`` to ``size`` entries (padding entries own no blocks)."""
    return tuple(values) + (fill,) * (size - len(values))


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .mask_bits import block_selection, compact_index

    @triton.jit
    def round_like(x, like, EMULATE_BF16: tl.constexpr):
        """``x`` (fp32) rounded to the dtype of ``like`` (round to nearest even).

        With EMULATE_BF16 (set under the Triton interpreter, whose fp32 -> bf16 cast truncates) bf16 is
        rounded with integer operations: ``(bits + 0x7FFF + lsb) >> 16``, NaN -> 0x7FC0 as in torch.
        Compiled kernels use the hardware conversion (``cvt.rn.bf16.f32``), which rounds the same way.
        """
        if EMULATE_BF16 and like.dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            lsb = (bits >> 16) & 1
            rounded = (bits + lsb + 0x7FFF) >> 16
            rounded = tl.where(x != x, 0x7FC0, rounded)
            return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(like.dtype)

    @triton.jit
    def _adamw_update_block(
        p_ptr,
        g_ptr,
        m_ptr,
        v_ptr,
        prefix_ptr,
        block,
        offs,
        valid,
        sel,
        neg_step_size,
        bc2_sqrt,
        decay,
        beta2,
        w1,
        omb2,
        eps,
        COMPACT: tl.constexpr,
        DECAY_ALL: tl.constexpr,
        LERP_SMALL: tl.constexpr,
        EMULATE_BF16: tl.constexpr,
    ):
        """Load, update (module docstring formula, fp32) and store one block.

        p and g are read for the whole block (vectorisable); the new value is kept where ``upd`` (the
        selected elements, or every valid one with DECAY_ALL) and the loaded bits elsewhere, so
        unselected weights are stored back bit for bit. Dense moments likewise; compact moments are
        gathered/scattered at the selected elements' compact indices only.
        """
        p_raw = tl.load(p_ptr + offs, mask=valid, other=0.0)
        g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        if DECAY_ALL:
            g = tl.where(sel, g, 0.0)
            upd = valid
        else:
            upd = sel
        if COMPACT:
            state = compact_index(prefix_ptr, block, sel)
            m_raw = tl.load(m_ptr + state, mask=sel, other=0.0)
            v_raw = tl.load(v_ptr + state, mask=sel, other=0.0)
        else:
            state = offs
            m_raw = tl.load(m_ptr + state, mask=valid, other=0.0)
            v_raw = tl.load(v_ptr + state, mask=valid, other=0.0)
        p = p_raw.to(tl.float32) * decay
        m = m_raw.to(tl.float32)
        v = v_raw.to(tl.float32)
        if LERP_SMALL:
            m = m + w1 * (g - m)
        else:
            m = g - (g - m) * (1.0 - w1)
        v = v * beta2 + (omb2 * g) * g
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p + tl.div_rn(neg_step_size * m, denom)
        tl.store(p_ptr + offs, tl.where(upd, round_like(p, p_raw, EMULATE_BF16), p_raw), mask=valid)
        if COMPACT:
            tl.store(m_ptr + state, round_like(m, m_raw, EMULATE_BF16), mask=sel)
            tl.store(v_ptr + state, round_like(v, v_raw, EMULATE_BF16), mask=sel)
        else:
            tl.store(m_ptr + state, tl.where(upd, round_like(m, m_raw, EMULATE_BF16), m_raw), mask=valid)
            tl.store(v_ptr + state, tl.where(upd, round_like(v, v_raw, EMULATE_BF16), v_raw), mask=valid)

    @triton.jit
    def _adamw_tensor_block(
        p_ptr,
        g_ptr,
        m_ptr,
        v_ptr,
        bits_ptr,
        prefix_ptr,
        n,
        block,
        neg_step_size,
        bc2_sqrt,
        decay,
        beta2,
        w1,
        omb2,
        eps,
        MASKED: tl.constexpr,
        COMPACT: tl.constexpr,
        DECAY_ALL: tl.constexpr,
        LERP_SMALL: tl.constexpr,
        EMULATE_BF16: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Block ``block`` (BLOCK elements from int64 offset ``block * BLOCK``) of an ``n``-element tensor:
        read its mask bits, skip it when nothing is selected (DECAY_ALL still updates it), else update it."""
        offs, valid, sel = block_selection(bits_ptr, n, block, MASKED=MASKED, BLOCK=BLOCK)
        if (tl.sum(sel.to(tl.int32), axis=0) > 0) | DECAY_ALL:
            _adamw_update_block(
                p_ptr,
                g_ptr,
                m_ptr,
                v_ptr,
                prefix_ptr,
                block,
                offs,
                valid,
                sel,
                neg_step_size,
                bc2_sqrt,
                decay,
                beta2,
                w1,
                omb2,
                eps,
                COMPACT=COMPACT,
                DECAY_ALL=DECAY_ALL,
                LERP_SMALL=LERP_SMALL,
                EMULATE_BF16=EMULATE_BF16,
            )

    @triton.jit(
        do_not_specialize=["NEG_STEP_SIZE", "BC2_SQRT", "decay", "beta2", "w1", "omb2", "eps"],
    )
    def _masked_adamw_kernel(
        P,
        G,
        M,
        V,
        BITS,
        PREFIX,
        N,
        NEG_STEP_SIZE,
        BC2_SQRT,
        decay,
        beta2,
        w1,
        omb2,
        eps,
        NUM: tl.constexpr,
        MASKED: tl.constexpr,
        COMPACT: tl.constexpr,
        DECAY_ALL: tl.constexpr,
        LERP_SMALL: tl.constexpr,
        EMULATE_BF16: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Masked AdamW over ``NUM`` tensors (module docstring formula).

        P, G, M, V, BITS, PREFIX: tuples of NUM pointers (param, grad, exp_avg, exp_avg_sq, mask bytes,
        compact block prefix; BITS/PREFIX are placeholders when not MASKED/COMPACT). N: numels.
        Program ``(b, i)`` updates block ``b`` of tensor ``i`` (grid: blocks of the largest tensor x
        tensors; blocks past a tensor's end return at once). NEG_STEP_SIZE, BC2_SQRT: per-tensor
        ``-lr/(1-beta1^t)`` and ``sqrt(1-beta2^t)``; decay = ``1 - lr*wd``, w1 = ``1 - beta1``,
        omb2 = ``1 - beta2``.
        """
        block = tl.program_id(0)
        tensor = tl.program_id(1)
        for i in tl.static_range(NUM):
            if (tensor == i) & (block.to(tl.int64) * BLOCK < N[i]):
                _adamw_tensor_block(
                    P[i],
                    G[i],
                    M[i],
                    V[i],
                    BITS[i],
                    PREFIX[i],
                    N[i],
                    block,
                    NEG_STEP_SIZE[i],
                    BC2_SQRT[i],
                    decay,
                    beta2,
                    w1,
                    omb2,
                    eps,
                    MASKED=MASKED,
                    COMPACT=COMPACT,
                    DECAY_ALL=DECAY_ALL,
                    LERP_SMALL=LERP_SMALL,
                    EMULATE_BF16=EMULATE_BF16,
                    BLOCK=BLOCK,
                )


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
    launches = 0
    for chunk in launch_chunks([p.numel() for p in params], max_tensors):
        size = padded_size(len(chunk))
        first = scalars[chunk[0]]
        p0 = params[chunk[0]]
        p_list = [params[i] for i in chunk]
        bits = [packed[i] for i in chunk] if packed is not None else p_list
        prefix = [prefixes[i] for i in chunk] if prefixes is not None else p_list
        _masked_adamw_kernel[launch_grid([p.numel() for p in p_list])](
            pad(p_list, size, p0),
            pad([_contiguous(grads[i]) for i in chunk], size, p0),
            pad([exp_avgs[i] for i in chunk], size, p0),
            pad([exp_avg_sqs[i] for i in chunk], size, p0),
            pad(bits, size, bits[0]),
            pad(prefix, size, prefix[0]),
            pad([p.numel() for p in p_list], size, 0),
            pad([scalars[i].neg_step_size for i in chunk], size, 0.0),
            pad([scalars[i].bc2_sqrt for i in chunk], size, 1.0),
            first.decay,
            first.beta2,
            first.one_minus_beta1,
            first.one_minus_beta2,
            first.eps,
            NUM=size,
            MASKED=packed is not None,
            COMPACT=prefixes is not None,
            DECAY_ALL=decay_all,
            LERP_SMALL=abs(first.one_minus_beta1) < 0.5,
            EMULATE_BF16=interpreter_enabled(),
            BLOCK=STATE_BLOCK,
            num_warps=num_warps,
            **launch_options(),
        )
        launches += 1
    return launches


def compile_variants(num: int = MAX_TENSORS_PER_LAUNCH, dtype: str = "bf16", state: str = "fp32"):
    """``(label, kernel, signature, constexprs)`` for ahead-of-time compile checks of every variant
    the optimizer launches (see ``tests/compile_kernels.py``)."""
    ptr, sptr = f"*{dtype}", f"*{state}"
    signature = {
        "P": (ptr,) * num,
        "G": (ptr,) * num,
        "M": (sptr,) * num,
        "V": (sptr,) * num,
        "BITS": ("*u8",) * num,
        "PREFIX": ("*i64",) * num,
        "N": ("i32",) * num,
        "NEG_STEP_SIZE": ("fp32",) * num,
        "BC2_SQRT": ("fp32",) * num,
        "decay": "fp32",
        "beta2": "fp32",
        "w1": "fp32",
        "omb2": "fp32",
        "eps": "fp32",
        "NUM": "constexpr",
        "MASKED": "constexpr",
        "COMPACT": "constexpr",
        "DECAY_ALL": "constexpr",
        "LERP_SMALL": "constexpr",
        "EMULATE_BF16": "constexpr",
        "BLOCK": "constexpr",
    }
    for masked, compact, decay_all in (
        (True, True, False),
        (True, False, False),
        (True, False, True),
        (False, False, False),
    ):
        yield (
            f"masked adamw x{num} {dtype}/{state} masked={masked} compact={compact} decay_all={decay_all}",
            _masked_adamw_kernel,
            signature,
            {
                "NUM": num,
                "MASKED": masked,
                "COMPACT": compact,
                "DECAY_ALL": decay_all,
                "LERP_SMALL": True,
                "EMULATE_BF16": False,
                "BLOCK": STATE_BLOCK,
            },
        )


def aligned_attrs(signature: dict) -> dict:
    """Specialization attributes of a launch whose pointers are 16-byte aligned and whose numels ``N``
    are multiples of 16 (what the JIT derives at run time): ``{(arg, element): [["tt.divisibility", 16]]}``
    for ``ASTSource(..., attrs=...)`` in ahead-of-time compile checks."""
    attrs = {}
    for index, (name, kind) in enumerate(signature.items()):
        if isinstance(kind, tuple):
            for element, ty in enumerate(kind):
                if ty.startswith("*") or name == "N":
                    attrs[(index, element)] = [["tt.divisibility", 16]]
    return attrs
