"""The masked multi-tensor launcher shared by the optimizer kernels.

An optimizer kernel is one elementwise *update function* (a ``@triton.jit`` function passed to
:func:`masked_multi_tensor_kernel` as the constexpr ``UPDATE``) plus the scalars it reads. Everything
else is here, once:

* grouping: tensors of one step are launched ``MAX_TENSORS_PER_LAUNCH`` per launch, largest first
  (:func:`launch_chunks`); each tensor is its own set of pointer arguments (Triton tuples: no pointer
  table in memory, so the kernels also run in the interpreter); tuples are padded to a power of two
  so few variants compile;
* the grid ``(blocks of the launch's largest tensor, tensors)``: program ``(b, i)`` updates block ``b``
  of tensor ``i`` and returns at once past that tensor's end;
* the mask: block ``b``'s bits are read (:func:`wagle_kernels.mask_bits.block_selection`) and a block
  without a selected weight is skipped;
* state layouts: *dense* states are param-shaped; *compact* states hold the selected weights only, at
  index ``prefix[b] + #{selected j in block b before i}`` (:mod:`wagle_kernels.mask_bits`);
* rounding: new values are stored in each tensor's dtype, round to nearest even; unselected weights
  (and their dense states) are written back with the bits they were read with.

The update contract::

    p, s0, s1 = UPDATE(p, g, s0, s1, a, b, SHARED, FLAGS)

on fp32 blocks (``s0``/``s1``: the first two state tensors, zeros where an optimizer has fewer),
``a``/``b``: two per-tensor fp32 scalars, ``SHARED``: a tuple of fp32 scalars the launch shares,
``FLAGS``: a constexpr tuple of the optimizer's compile-time switches.

Adding an optimizer kernel: write its update function and its torch reference, then call
:func:`launch_masked_update` with its scalars (see :mod:`wagle_kernels.masked_sgd`, ~40 lines of kernel
code). :func:`compile_signature` gives the ahead-of-time compile signature of every variant.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._runtime import HAS_TRITON, interpreter_enabled, launch_options
from .mask_bits import STATE_BLOCK

MAX_TENSORS_PER_LAUNCH = 16  # a power of two; tensors per launch are padded to a power of two
MAX_STATES = 2  # state tensors per parameter the launcher streams (AdamW: 2, SGD: 0 or 1)


def math_dtype(param: torch.Tensor) -> torch.dtype:
    """The torch paths compute in fp32, or fp64 for fp64 parameters (the kernels support 16/32-bit)."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


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


def contiguous(t: torch.Tensor) -> torch.Tensor:
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
    def _store_state(ptr, state, new, raw, upd, smask, COMPACT: tl.constexpr, EMULATE_BF16: tl.constexpr):
        """Store a state block: compact states at the selected elements only, dense ones for the whole
        block with the loaded bits kept where not updated."""
        if COMPACT:
            tl.store(ptr + state, round_like(new, raw, EMULATE_BF16), mask=smask)
        else:
            tl.store(ptr + state, tl.where(upd, round_like(new, raw, EMULATE_BF16), raw), mask=smask)

    @triton.jit
    def _update_block(
        p_ptr,
        g_ptr,
        s0_ptr,
        s1_ptr,
        bits_ptr,
        prefix_ptr,
        n,
        block,
        a,
        b,
        SHARED,
        UPDATE: tl.constexpr,
        FLAGS: tl.constexpr,
        NUM_STATES: tl.constexpr,
        MASKED: tl.constexpr,
        COMPACT: tl.constexpr,
        UPDATE_ALL: tl.constexpr,
        EMULATE_BF16: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Block ``block`` of one tensor: read its mask bits, skip it when nothing is selected (UPDATE_ALL
        still updates it), else load, ``UPDATE`` and store it."""
        offs, valid, sel = block_selection(bits_ptr, n, block, MASKED=MASKED, BLOCK=BLOCK)
        if (tl.sum(sel.to(tl.int32), axis=0) > 0) | UPDATE_ALL:
            p_raw = tl.load(p_ptr + offs, mask=valid, other=0.0)
            g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            if UPDATE_ALL:  # every weight updated, with the gradient zeroed where unselected
                g = tl.where(sel, g, 0.0)
                upd = valid
            else:
                upd = sel
            if COMPACT:
                state = compact_index(prefix_ptr, block, sel)
                smask = sel
            else:
                state = offs
                smask = valid
            s0_raw = p_raw
            s1_raw = p_raw
            s0 = tl.zeros((BLOCK,), tl.float32)
            s1 = tl.zeros((BLOCK,), tl.float32)
            if NUM_STATES >= 1:
                s0_raw = tl.load(s0_ptr + state, mask=smask, other=0.0)
                s0 = s0_raw.to(tl.float32)
            if NUM_STATES >= 2:
                s1_raw = tl.load(s1_ptr + state, mask=smask, other=0.0)
                s1 = s1_raw.to(tl.float32)
            p, s0, s1 = UPDATE(p_raw.to(tl.float32), g, s0, s1, a, b, SHARED, FLAGS)
            tl.store(p_ptr + offs, tl.where(upd, round_like(p, p_raw, EMULATE_BF16), p_raw), mask=valid)
            if NUM_STATES >= 1:
                _store_state(
                    s0_ptr, state, s0, s0_raw, upd, smask, COMPACT=COMPACT, EMULATE_BF16=EMULATE_BF16
                )
            if NUM_STATES >= 2:
                _store_state(
                    s1_ptr, state, s1, s1_raw, upd, smask, COMPACT=COMPACT, EMULATE_BF16=EMULATE_BF16
                )

    @triton.jit(do_not_specialize=["A", "B", "SHARED"])
    def masked_multi_tensor_kernel(
        P,
        G,
        S0,
        S1,
        BITS,
        PREFIX,
        N,
        A,
        B,
        SHARED,
        UPDATE: tl.constexpr,
        FLAGS: tl.constexpr,
        NUM_STATES: tl.constexpr,
        NUM: tl.constexpr,
        MASKED: tl.constexpr,
        COMPACT: tl.constexpr,
        UPDATE_ALL: tl.constexpr,
        EMULATE_BF16: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One masked optimizer step over ``NUM`` tensors (module docstring).

        P, G, S0, S1, BITS, PREFIX: tuples of NUM pointers (param, grad, two states, mask bytes, compact
        block prefix; placeholders where unused). N: numels. A, B: per-tensor fp32 scalars. SHARED: the
        launch's fp32 scalars. Program ``(b, i)`` updates block ``b`` of tensor ``i``.
        """
        block = tl.program_id(0)
        tensor = tl.program_id(1)
        for i in tl.static_range(NUM):
            if (tensor == i) & (block.to(tl.int64) * BLOCK < N[i]):
                _update_block(
                    P[i],
                    G[i],
                    S0[i],
                    S1[i],
                    BITS[i],
                    PREFIX[i],
                    N[i],
                    block,
                    A[i],
                    B[i],
                    SHARED,
                    UPDATE=UPDATE,
                    FLAGS=FLAGS,
                    NUM_STATES=NUM_STATES,
                    MASKED=MASKED,
                    COMPACT=COMPACT,
                    UPDATE_ALL=UPDATE_ALL,
                    EMULATE_BF16=EMULATE_BF16,
                    BLOCK=BLOCK,
                )


def launch_masked_update(
    update,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[Sequence[torch.Tensor]],
    packed: Sequence[torch.Tensor] | None,
    prefixes: Sequence[torch.Tensor] | None,
    per_tensor: tuple[Sequence[float], Sequence[float]],
    shared: tuple[float, ...],
    flags: tuple,
    *,
    update_all: bool = False,
    max_tensors: int = MAX_TENSORS_PER_LAUNCH,
    num_warps: int = 8,
) -> int:
    """Launch ``update`` over ``params`` (in place); returns the number of launches.

    Args:
        update: the optimizer's ``@triton.jit`` elementwise update function (module docstring).
        params, grads: contiguous parameters on one device and their gradients.
        states: up to two lists of state tensors (one tensor per parameter; dense or compact).
        packed: each tensor's mask bits (uint8, ``ceil(numel / 8)``), or None to update every weight.
        prefixes: each tensor's compact block prefix when the states are compact, else None.
        per_tensor: two lists of per-tensor fp32 scalars (``a``, ``b`` of the update function).
        shared: the launch's fp32 scalars; flags: the update function's constexpr switches.
        update_all: update every weight with the gradient zeroed where the mask is 0 (needs ``packed``).
        max_tensors: tensors per launch (a power of two).
    """
    if not HAS_TRITON:  # pragma: no cover - guarded by the optimizers
        raise RuntimeError("launch_masked_update: triton is not installed")
    if len(states) > MAX_STATES:
        raise ValueError(f"states: at most {MAX_STATES} state tensors per parameter, got {len(states)}")
    count = len(params)
    for name, seq in (("grads", grads), *((f"states[{j}]", s) for j, s in enumerate(states))):
        if len(seq) != count:
            raise ValueError(f"{name}: expected {count} entries, got {len(seq)}")
    a_values, b_values = per_tensor
    launches = 0
    for chunk in launch_chunks([p.numel() for p in params], max_tensors):
        size = padded_size(len(chunk))
        p_list = [params[i] for i in chunk]
        p0 = p_list[0]
        state_lists = [[s[i] for i in chunk] for s in states]
        state_lists += [p_list] * (MAX_STATES - len(state_lists))
        bits = [packed[i] for i in chunk] if packed is not None else p_list
        prefix = [prefixes[i] for i in chunk] if prefixes is not None else p_list
        numels = [p.numel() for p in p_list]
        masked_multi_tensor_kernel[launch_grid(numels)](
            pad(p_list, size, p0),
            pad([contiguous(grads[i]) for i in chunk], size, p0),
            pad(state_lists[0], size, state_lists[0][0]),
            pad(state_lists[1], size, state_lists[1][0]),
            pad(bits, size, bits[0]),
            pad(prefix, size, prefix[0]),
            pad(numels, size, 0),
            pad([float(a_values[i]) for i in chunk], size, 0.0),
            pad([float(b_values[i]) for i in chunk], size, 1.0),
            tuple(float(x) for x in shared),
            UPDATE=update,
            FLAGS=tuple(flags),
            NUM_STATES=len(states),
            NUM=size,
            MASKED=packed is not None,
            COMPACT=prefixes is not None,
            UPDATE_ALL=update_all,
            EMULATE_BF16=interpreter_enabled(),
            BLOCK=STATE_BLOCK,
            num_warps=num_warps,
            **launch_options(),
        )
        launches += 1
    return launches


def compile_signature(
    num: int, num_shared: int, dtype: str = "bf16", state: str = "fp32", index: str = "i32"
) -> dict:
    """The ahead-of-time compile signature of :func:`masked_multi_tensor_kernel` for ``num`` tensors of
    ``dtype`` with ``state``-typed states and ``num_shared`` shared scalars. ``index="i64"`` is the
    variant the JIT builds for tensors of 2^31 or more elements."""
    ptr, sptr = f"*{dtype}", f"*{state}"
    return {
        "P": (ptr,) * num,
        "G": (ptr,) * num,
        "S0": (sptr,) * num,
        "S1": (sptr,) * num,
        "BITS": ("*u8",) * num,
        "PREFIX": ("*i64",) * num,
        "N": (index,) * num,
        "A": ("fp32",) * num,
        "B": ("fp32",) * num,
        "SHARED": ("fp32",) * num_shared,
        "UPDATE": "constexpr",
        "FLAGS": "constexpr",
        "NUM_STATES": "constexpr",
        "NUM": "constexpr",
        "MASKED": "constexpr",
        "COMPACT": "constexpr",
        "UPDATE_ALL": "constexpr",
        "EMULATE_BF16": "constexpr",
        "BLOCK": "constexpr",
    }


def compile_constexprs(
    update, flags: tuple, num_states: int, num: int, masked: bool, compact: bool, update_all: bool = False
) -> dict:
    """The constexpr values of one compiled variant (the JIT's values on a GPU: no bf16 emulation)."""
    return {
        "UPDATE": update,
        "FLAGS": tuple(flags),
        "NUM_STATES": num_states,
        "NUM": num,
        "MASKED": masked,
        "COMPACT": compact,
        "UPDATE_ALL": update_all,
        "EMULATE_BF16": False,
        "BLOCK": STATE_BLOCK,
    }
