"""Per-weight attribution scores and their order-preserving integer keys.

Every score is computed in fp32 from inputs of any of fp32/bf16/fp16 (upcast exactly), with the
operations below in this order and each rounded once (no FMA contraction), so the Triton kernels and
the torch reference produce bit-identical scores:

===========  ===============================================  ==========================
method       score S_i                                        inputs read
===========  ===============================================  ==========================
wagle        |(w_i - g_r,i * (1/gamma)) * g_f,i|              w, g_f, g_r
snip         |w_i * g_f,i|                                    w, g_f
gradient     |g_f,i|                                          g_f
magnitude    |w_i|                                            w
random       hash(seed, global position i) / 2^24 in [0, 1)   nothing
===========  ===============================================  ==========================

``1/gamma`` is rounded to fp32 once on the host (for the default gamma = 1e-6 it is exactly 1e6).

Keys. A score S >= 0 maps to the int32 key ``bits(S) + 1`` (IEEE-754 bits of a non-negative float
are ordered like the float), which lies in ``[1, 0x7F800000]``; a non-finite score maps to key 0, the
lowest. Selecting the top-k scores is selecting the top-k keys, which radix select does digit by digit.
"""

from __future__ import annotations

import torch

from ._runtime import HAS_TRITON

METHODS = ("wagle", "snip", "gradient", "magnitude", "random")
METHOD_IDS = {name: i for i, name in enumerate(METHODS)}
# Which of (weight, forget gradient, retain gradient) each method reads.
METHOD_INPUTS = {
    "wagle": (True, True, True),
    "snip": (True, True, False),
    "gradient": (False, True, False),
    "magnitude": (True, False, False),
    "random": (False, False, False),
}

KEY_BITS = 31  # keys are in [0, 2^31)
NONFINITE_KEY = 0
_FINITE_LIMIT = 0x7F800000  # bits of +inf
_MIX_A = 0x7FEB352D
_MIX_B = 0x297A2D39
_U32 = 0xFFFFFFFF
RANDOM_SCALE = 1.0 / (1 << 24)


def inverse_gamma(gamma: float) -> float:
    """``1/gamma`` rounded to fp32, the factor both backends multiply g_r by."""
    return float(torch.tensor(1.0 / gamma, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------
# torch reference
# ---------------------------------------------------------------------------------------------
def _mix32_torch(x: torch.Tensor) -> torch.Tensor:
    """32-bit integer finalizer on int64 tensors holding uint32 values (products stay < 2^63)."""
    x = x ^ (x >> 16)
    x = (x * _MIX_A) & _U32
    x = x ^ (x >> 15)
    x = (x * _MIX_B) & _U32
    return x ^ (x >> 16)


def random_scores_torch(positions: torch.Tensor, seed: int) -> torch.Tensor:
    """Counter-based uniform numbers in [0, 1): ``mix(lo ^ mix(hi ^ mix(seed))) >> 8`` scaled by 2^-24,
    where ``lo``/``hi`` are the low/high 32 bits of the int64 global position."""
    seed_mix = _mix32_torch(torch.tensor(seed & _U32, dtype=torch.int64))
    lo = positions & _U32
    hi = (positions >> 32) & _U32
    h = _mix32_torch(lo ^ _mix32_torch(hi ^ seed_mix))
    return (h >> 8).to(torch.float32) * RANDOM_SCALE


def scores_torch(
    method: str,
    weight: torch.Tensor | None,
    grad_forget: torch.Tensor | None,
    grad_retain: torch.Tensor | None,
    *,
    inv_gamma: float = 1e6,
    seed: int = 0,
    start: int = 0,
    numel: int | None = None,
) -> torch.Tensor:
    """fp32 scores of flat input slices (see the module table). ``start`` is the global position of
    the first element (used by ``random``); ``numel`` sizes the output when no input is read."""
    if method == "wagle":
        w, gf, gr = weight.float(), grad_forget.float(), grad_retain.float()
        return ((w - gr * inv_gamma) * gf).abs_()
    if method == "snip":
        return (weight.float() * grad_forget.float()).abs_()
    if method == "gradient":
        return grad_forget.float().abs()
    if method == "magnitude":
        return weight.float().abs()
    if method == "random":
        positions = torch.arange(start, start + numel, dtype=torch.int64)
        return random_scores_torch(positions, seed)
    raise ValueError(f"method: unknown scoring method {method!r}; expected one of {METHODS}")


def keys_torch(scores: torch.Tensor) -> torch.Tensor:
    """Order-preserving int32 keys of non-negative fp32 scores; non-finite scores get key 0."""
    bits = scores.view(torch.int32) & 0x7FFFFFFF
    return torch.where(bits < _FINITE_LIMIT, bits + 1, torch.zeros_like(bits))


# ---------------------------------------------------------------------------------------------
# Triton device functions (inlined into the selection kernels)
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    _MIX_A_C = tl.constexpr(_MIX_A)
    _MIX_B_C = tl.constexpr(_MIX_B)
    _RANDOM_SCALE_C = tl.constexpr(RANDOM_SCALE)

    @triton.jit
    def _mix32(x):
        """The same finalizer as ``_mix32_torch`` on uint32 lanes (wrapping multiplies)."""
        x = x ^ (x >> 16)
        x = x * tl.full(x.shape, _MIX_A_C, tl.uint32)
        x = x ^ (x >> 15)
        x = x * tl.full(x.shape, _MIX_B_C, tl.uint32)
        return x ^ (x >> 16)

    @triton.jit
    def score_block(w_ptr, gf_ptr, gr_ptr, offs, valid, start, inv_gamma, seed, METHOD: tl.constexpr):
        """fp32 scores of one block of flat offsets ``offs`` (int64); METHOD indexes ``METHODS``."""
        if METHOD == 0:  # wagle: |(w - g_r * (1/gamma)) * g_f|
            w = tl.load(w_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            gf = tl.load(gf_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            gr = tl.load(gr_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            s = tl.abs((w - gr * inv_gamma) * gf)
        elif METHOD == 1:  # snip: |w * g_f|
            w = tl.load(w_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            gf = tl.load(gf_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            s = tl.abs(w * gf)
        elif METHOD == 2:  # gradient: |g_f|
            s = tl.abs(tl.load(gf_ptr + offs, mask=valid, other=0.0).to(tl.float32))
        elif METHOD == 3:  # magnitude: |w|
            s = tl.abs(tl.load(w_ptr + offs, mask=valid, other=0.0).to(tl.float32))
        else:  # random: counter-based hash of (seed, global position)
            pos = start + offs
            lo = (pos & 0xFFFFFFFF).to(tl.uint32)
            hi = ((pos >> 32) & 0xFFFFFFFF).to(tl.uint32)
            seed_mix = _mix32(tl.full(offs.shape, seed, tl.uint32))
            h = _mix32(lo ^ _mix32(hi ^ seed_mix))
            s = (h >> 8).to(tl.float32) * _RANDOM_SCALE_C
        return s

    @triton.jit
    def key_block(s):
        """int32 keys of fp32 scores: ``bits(s) + 1`` for finite ``s >= 0``, 0 for NaN/Inf."""
        bits = s.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        return tl.where(bits < 0x7F800000, bits + 1, 0)
