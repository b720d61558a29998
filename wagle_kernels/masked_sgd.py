"""Masked SGD (momentum, dampening, Nesterov, coupled weight decay) on bit-packed masks.

For a selected weight, ``torch.optim.SGD``'s update in its operation order (fp32 math)::

    d <- g + wd * p                                      (only when wd != 0)
    b <- d                                               first step with momentum
    b <- b * momentum + (1 - dampening) * d              later steps
    d <- d + momentum * b   (Nesterov)    or    d <- b   (momentum > 0)
    p <- p + (-lr) * d

Unselected weights keep their exact bits and own no momentum buffer; the compact layout stores the
buffer for selected weights only, indexed like :mod:`wagle_kernels.masked_adamw`'s compact moments.
Launches: tensors are grouped ``MAX_TENSORS_PER_LAUNCH`` per launch as in masked AdamW.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._runtime import HAS_TRITON, interpreter_enabled, launch_options
from .mask_bits import STATE_BLOCK
from .masked_adamw import (
    MAX_TENSORS_PER_LAUNCH,
    _contiguous,
    launch_chunks,
    launch_grid,
    math_dtype,
    pad,
    padded_size,
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

    from .mask_bits import block_selection, compact_index
    from .masked_adamw import round_like

    @triton.jit
    def _sgd_update_block(
        p_ptr,
        g_ptr,
        b_ptr,
        prefix_ptr,
        block,
        offs,
        valid,
        sel,
        first,
        neg_lr,
        momentum,
        one_minus_dampening,
        weight_decay,
        COMPACT: tl.constexpr,
        HAS_WD: tl.constexpr,
        HAS_MOMENTUM: tl.constexpr,
        NESTEROV: tl.constexpr,
        EMULATE_BF16: tl.constexpr,
    ):
        """Load, update (module docstring formula, fp32) and store one block; unselected elements are
        stored back with the bits they were read with (dense buffers likewise)."""
        p_raw = tl.load(p_ptr + offs, mask=valid, other=0.0)
        p = p_raw.to(tl.float32)
        d = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        if HAS_WD:
            d = d + weight_decay * p
        if HAS_MOMENTUM:
            if COMPACT:
                state = compact_index(prefix_ptr, block, sel)
                b_raw = tl.load(b_ptr + state, mask=sel, other=0.0)
            else:
                state = offs
                b_raw = tl.load(b_ptr + state, mask=valid, other=0.0)
            b = d
            if first == 0.0:
                b = b_raw.to(tl.float32) * momentum + one_minus_dampening * d
            if COMPACT:
                tl.store(b_ptr + state, round_like(b, b_raw, EMULATE_BF16), mask=sel)
            else:
                tl.store(b_ptr + state, tl.where(sel, round_like(b, b_raw, EMULATE_BF16), b_raw), mask=valid)
            if NESTEROV:
                d = d + momentum * b
            else:
                d = b
        p = p + neg_lr * d
        tl.store(p_ptr + offs, tl.where(sel, round_like(p, p_raw, EMULATE_BF16), p_raw), mask=valid)

    @triton.jit
    def _sgd_tensor_block(
        p_ptr,
        g_ptr,
        b_ptr,
        bits_ptr,
        prefix_ptr,
        n,
        block,
        first,
        neg_lr,
        momentum,
        one_minus_dampening,
        weight_decay,
        MASKED: tl.constexpr,
        COMPACT: tl.constexpr,
        HAS_WD: tl.constexpr,
        HAS_MOMENTUM: tl.constexpr,
        NESTEROV: tl.constexpr,
        EMULATE_BF16: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Block ``block`` of an ``n``-element tensor; skipped when none of its weights is selected."""
        offs, valid, sel = block_selection(bits_ptr, n, block, MASKED=MASKED, BLOCK=BLOCK)
        if tl.sum(sel.to(tl.int32), axis=0) > 0:
            _sgd_update_block(
                p_ptr,
                g_ptr,
                b_ptr,
                prefix_ptr,
                block,
                offs,
                valid,
                sel,
                first,
                neg_lr,
                momentum,
                one_minus_dampening,
                weight_decay,
                COMPACT=COMPACT,
                HAS_WD=HAS_WD,
                HAS_MOMENTUM=HAS_MOMENTUM,
                NESTEROV=NESTEROV,
                EMULATE_BF16=EMULATE_BF16,
            )

    @triton.jit(do_not_specialize=["FIRST", "neg_lr", "momentum", "one_minus_dampening", "weight_decay"])
    def _masked_sgd_kernel(
        P,
        G,
        B,
        BITS,
        PREFIX,
        N,
        FIRST,
        neg_lr,
        momentum,
        one_minus_dampening,
        weight_decay,
        NUM: tl.constexpr,
        MASKED: tl.constexpr,
        COMPACT: tl.constexpr,
        HAS_WD: tl.constexpr,
        HAS_MOMENTUM: tl.constexpr,
        NESTEROV: tl.constexpr,
        EMULATE_BF16: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Masked SGD over ``NUM`` tensors (module docstring formula).

        P, G, B, BITS, PREFIX: tuples of pointers (param, grad, momentum buffer, mask bytes, compact
        block prefix; placeholders where unused). N: numels. Program ``(b, i)`` updates block ``b`` of
        tensor ``i``. FIRST: per tensor, 1.0 on the first momentum step (the buffer is set to ``d``;
        floats, so the flags do not specialise the kernel). neg_lr = ``-lr``.
        """
        block = tl.program_id(0)
        tensor = tl.program_id(1)
        for i in tl.static_range(NUM):
            if (tensor == i) & (block.to(tl.int64) * BLOCK < N[i]):
                _sgd_tensor_block(
                    P[i],
                    G[i],
                    B[i],
                    BITS[i],
                    PREFIX[i],
                    N[i],
                    block,
                    FIRST[i],
                    neg_lr,
                    momentum,
                    one_minus_dampening,
                    weight_decay,
                    MASKED=MASKED,
                    COMPACT=COMPACT,
                    HAS_WD=HAS_WD,
                    HAS_MOMENTUM=HAS_MOMENTUM,
                    NESTEROV=NESTEROV,
                    EMULATE_BF16=EMULATE_BF16,
                    BLOCK=BLOCK,
                )


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
    launches = 0
    for chunk in launch_chunks([p.numel() for p in params], max_tensors):
        size = padded_size(len(chunk))
        p_list = [params[i] for i in chunk]
        p0 = p_list[0]
        b_list = [bufs[i] for i in chunk] if has_momentum else p_list
        bits = [packed[i] for i in chunk] if packed is not None else p_list
        prefix = [prefixes[i] for i in chunk] if prefixes is not None and has_momentum else p_list
        numels = [p.numel() for p in p_list]
        _masked_sgd_kernel[launch_grid(numels)](
            pad(p_list, size, p0),
            pad([_contiguous(grads[i]) for i in chunk], size, p0),
            pad(b_list, size, b_list[0]),
            pad(bits, size, bits[0]),
            pad(prefix, size, prefix[0]),
            pad(numels, size, 0),
            pad([float(first[i]) for i in chunk], size, 0.0),
            -s.lr,
            s.momentum,
            1 - s.dampening,
            s.weight_decay,
            NUM=size,
            MASKED=packed is not None,
            COMPACT=prefixes is not None and has_momentum,
            HAS_WD=s.weight_decay != 0,
            HAS_MOMENTUM=has_momentum,
            NESTEROV=s.nesterov,
            EMULATE_BF16=interpreter_enabled(),
            BLOCK=STATE_BLOCK,
            num_warps=num_warps,
            **launch_options(),
        )
        launches += 1
    return launches


def compile_variants(num: int = MAX_TENSORS_PER_LAUNCH, dtype: str = "bf16", state: str = "fp32"):
    """``(label, kernel, signature, constexprs)`` for ahead-of-time compile checks."""
    signature = {
        "P": (f"*{dtype}",) * num,
        "G": (f"*{dtype}",) * num,
        "B": (f"*{state}",) * num,
        "BITS": ("*u8",) * num,
        "PREFIX": ("*i64",) * num,
        "N": ("i32",) * num,
        "FIRST": ("fp32",) * num,
        "neg_lr": "fp32",
        "momentum": "fp32",
        "one_minus_dampening": "fp32",
        "weight_decay": "fp32",
        "NUM": "constexpr",
        "MASKED": "constexpr",
        "COMPACT": "constexpr",
        "HAS_WD": "constexpr",
        "HAS_MOMENTUM": "constexpr",
        "NESTEROV": "constexpr",
        "EMULATE_BF16": "constexpr",
        "BLOCK": "constexpr",
    }
    for compact, momentum, nesterov in ((True, True, False), (False, True, True), (True, False, False)):
        yield (
            f"masked sgd x{num} {dtype}/{state} compact={compact} momentum={momentum} nesterov={nesterov}",
            _masked_sgd_kernel,
            signature,
            {
                "NUM": num,
                "MASKED": True,
                "COMPACT": compact,
                "HAS_WD": True,
                "HAS_MOMENTUM": momentum,
                "NESTEROV": nesterov,
                "EMULATE_BF16": False,
                "BLOCK": STATE_BLOCK,
            },
        )
