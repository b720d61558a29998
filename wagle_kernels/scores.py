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

Registry. :data:`SCORE_METHODS` maps each name to a :class:`ScoreMethod` (inputs read, torch function,
kernel id, whether it uses gamma or a seed, a one-line formula). Adding a method is one branch in
:func:`score_block` under a new ``kernel_id`` plus one :func:`register_method` call; the attribution
entry points, the CLI, the compile checks and the tests loop over the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._runtime import HAS_TRITON

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


@dataclass(frozen=True)
class ScoreContext:
    """What a score function may use besides its inputs: ``1/gamma`` (fp32-rounded), the seed, the
    global position of the slice's first element and the slice length."""

    inv_gamma: float
    seed: int
    start: int
    numel: int


ScoreFn = Callable[
    [torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, ScoreContext], torch.Tensor
]


@dataclass(frozen=True)
class ScoreMethod:
    """One attribution score method: every layer (torch path, Triton dispatch, attribution, CLI,
    compile checks, tests) reads these fields from :data:`SCORE_METHODS`.

    ``kernel_id`` selects the method's branch of :func:`score_block` (a constexpr ``METHOD``; an id
    without a branch fails at kernel compile time). ``reads`` says which of (weight, forget gradient,
    retain gradient) the score uses; ``torch_fn(w, g_f, g_r, ctx)`` is the reference path (fp32
    result, the same operations in the same order as the kernel branch).
    """

    name: str
    kernel_id: int
    reads: tuple[bool, bool, bool]
    torch_fn: ScoreFn
    needs_gamma: bool = False
    needs_seed: bool = False
    doc: str = ""

    @property
    def reads_weight(self) -> bool:
        return self.reads[0]

    @property
    def reads_forget(self) -> bool:
        return self.reads[1]

    @property
    def reads_retain(self) -> bool:
        return self.reads[2]

    @property
    def can_be_nonfinite(self) -> bool:
        """Scores computed from inputs can be NaN/Inf; input-free ones (``random``) cannot."""
        return any(self.reads)


def _wagle(w, gf, gr, ctx: ScoreContext) -> torch.Tensor:
    w, gf, gr = w.float(), gf.float(), gr.float()
    return ((w - gr * ctx.inv_gamma) * gf).abs_()


def _random(w, gf, gr, ctx: ScoreContext) -> torch.Tensor:
    positions = torch.arange(ctx.start, ctx.start + ctx.numel, dtype=torch.int64)
    return random_scores_torch(positions, ctx.seed)


SCORE_METHODS: dict[str, ScoreMethod] = {}


def register_method(method: ScoreMethod) -> ScoreMethod:
    """Add ``method`` to the registry (its name and kernel id must be new); returns it."""
    if method.name in SCORE_METHODS:
        raise ValueError(f"method: a score method named {method.name!r} is already registered")
    taken = {m.kernel_id: m.name for m in SCORE_METHODS.values()}
    if method.kernel_id in taken:
        raise ValueError(f"kernel_id: {method.kernel_id} is already used by {taken[method.kernel_id]!r}")
    SCORE_METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a registered method (used by tests that register a throwaway one)."""
    if name not in SCORE_METHODS:
        raise ValueError(f"method: no score method named {name!r} is registered")
    del SCORE_METHODS[name]


def method_names() -> tuple[str, ...]:
    """Registered score method names, in registration order."""
    return tuple(SCORE_METHODS)


def get_method(name: str) -> ScoreMethod:
    """The registered method ``name``; a clear error naming the choices otherwise."""
    method = SCORE_METHODS.get(name)
    if method is None:
        raise ValueError(f"method: unknown scoring method {name!r}; expected one of {list(SCORE_METHODS)}")
    return method


for _method in (
    ScoreMethod("wagle", 0, (True, True, True), _wagle, needs_gamma=True, doc="|(w - g_r/gamma) * g_f|"),
    ScoreMethod(
        "snip",
        1,
        (True, True, False),
        lambda w, gf, gr, ctx: (w.float() * gf.float()).abs_(),
        doc="|w * g_f|",
    ),
    ScoreMethod(
        "gradient",
        2,
        (False, True, False),
        lambda w, gf, gr, ctx: gf.float().abs(),
        doc="|g_f| (SalUn-style saliency)",
    ),
    ScoreMethod("magnitude", 3, (True, False, False), lambda w, gf, gr, ctx: w.float().abs(), doc="|w|"),
    ScoreMethod(
        "random",
        4,
        (False, False, False),
        _random,
        needs_seed=True,
        doc="hash(seed, global position) / 2^24 in [0, 1)",
    ),
):
    register_method(_method)
del _method

# Backwards-compatible views (import time: they do not see methods registered later)
METHODS = method_names()


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
    entry = get_method(method)
    if numel is None:
        present = [t for t in (weight, grad_forget, grad_retain) if t is not None]
        numel = present[0].numel() if present else 0
    return entry.torch_fn(weight, grad_forget, grad_retain, ScoreContext(inv_gamma, seed, start, numel))


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
        """fp32 scores of one block of flat offsets ``offs`` (int64); METHOD is a registered method's
        ``kernel_id`` (:data:`SCORE_METHODS`). An id without a branch here fails to compile."""
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
        elif METHOD == 4:  # random: counter-based hash of (seed, global position)
            pos = start + offs
            lo = (pos & 0xFFFFFFFF).to(tl.uint32)
            hi = ((pos >> 32) & 0xFFFFFFFF).to(tl.uint32)
            seed_mix = _mix32(tl.full(offs.shape, seed, tl.uint32))
            h = _mix32(lo ^ _mix32(hi ^ seed_mix))
            s = (h >> 8).to(tl.float32) * _RANDOM_SCALE_C
        else:
            tl.static_assert(False, "score_block: no kernel branch for this METHOD id")
            s = tl.zeros(offs.shape, tl.float32)
        return s

    @triton.jit
    def key_block(s):
        """int32 keys of fp32 scores: ``bits(s) + 1`` for finite ``s >= 0``, 0 for NaN/Inf."""
        bits = s.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        return tl.where(bits < 0x7F800000, bits + 1, 0)
