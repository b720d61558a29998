"""Exact top-k selection over many tensors by radix select on score keys, and bit-packed mask output.

Problem. Given score sources (tensors in a fixed order, each with a global start position), select
exactly ``k`` elements with the largest scores; ties are broken by global position (lower wins).

Algorithm (no sort, no materialised global score vector). Scores map to int32 keys in ``[0, 2^31)``
(:mod:`wagle_kernels.scores`). The threshold key ``T`` is found digit by digit, most significant
first (digits of 11, 10 and 10 bits): each pass histograms the next digit of the keys that share the
prefix found so far, and the cumulative count from the top tells which bin holds the k-th largest key.
Passes stop early when the whole bin is selected. Then:

* ``key > T`` is selected; of the keys equal to ``T`` only the first ``ties`` by global position are
  (a tie pass counts equal keys per block to give each block its rank offset; it only runs when the
  equal keys do not all fit);
* the mask pass writes 1 bit per weight, packed little-endian (:mod:`wagle_kernels.bitpack`).

Triton backend, two passes in the common case: pass 1 histograms the top digit; pass 2 writes the
bits of every key above the threshold bin and appends the keys inside it, with their positions, to a
candidate buffer (at most ``candidate_fraction`` of the weights, 12 bytes each); the lower digits and
the tie-break are then resolved on the candidates alone and their bits set with atomic ORs. When the
bin is larger than the buffer (e.g. a huge block of tied scores) it falls back to the full passes:
1-3 histogram passes + 0-1 tie pass + 1 mask pass. Every pass recomputes scores from (w, g_f, g_r)
instead of storing them. A pass is one launch per group of up to ``MAX_TENSORS_PER_LAUNCH`` (16)
consecutive tensors, passed as Triton tuples (as the masked optimizers do); its programs walk the
group's (tensor, block) work items. A selection over ``T`` tensors thus makes
``passes * ceil(T / 16)`` score-kernel launches plus at most three on the candidates (Llama-2-7B's 291
tensors: 41 in the common case instead of one launch per tensor per pass, 585).

Torch backend: one int32 key per weight (the size of one fp32 score buffer), ``torch.bincount``
histograms over the keys. Both backends produce bit-identical masks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ._runtime import HAS_TRITON, aligned_attrs, launch_options
from .bitpack import pack_bits, packed_size
from .multi_tensor import MAX_TENSORS_PER_LAUNCH, pad, padded_size
from .scores import KEY_BITS, SCORE_METHODS, get_method, keys_torch, scores_torch

RADIX_DIGITS: tuple[tuple[int, int], ...] = ((20, 11), (10, 10), (0, 10))  # (shift, bits), top first
assert sum(bits for _, bits in RADIX_DIGITS) == KEY_BITS


@dataclass
class ScoreSource:
    """One tensor's flat inputs to the score (``None`` where the method does not read it)."""

    name: str
    numel: int
    start: int  # global position of element 0 (for ``random`` and tie-breaking)
    weight: torch.Tensor | None
    grad_forget: torch.Tensor | None
    grad_retain: torch.Tensor | None


@dataclass(frozen=True)
class ScoreSpec:
    method: str
    inv_gamma: float
    seed: int


@dataclass(frozen=True)
class Threshold:
    """Select ``key > key_threshold``, plus the first ``ties`` elements (by position) with key equal to it."""

    key_threshold: int
    ties: int = 0

    @classmethod
    def everything(cls) -> Threshold:
        return cls(-1, 0)

    @classmethod
    def nothing(cls) -> Threshold:
        return cls((1 << KEY_BITS) - 1, 0)


@dataclass
class SelectionStats:
    """What a selection did: passes over the inputs (the torch backend: over its int32 keys), whether
    the threshold bin was resolved on collected candidates, and non-finite scores per tensor."""

    histogram_passes: int = 0
    tie_passes: int = 0
    mask_passes: int = 0
    compacted: bool = False  # the threshold bin was resolved on collected candidates (2 input passes)
    nonfinite: dict[str, int] = field(default_factory=dict)
    selected: dict[str, int] = field(default_factory=dict)  # set bits per tensor of the masks written

    @property
    def input_passes(self) -> int:
        return self.histogram_passes + self.tie_passes + self.mask_passes

    def add(self, other: SelectionStats) -> None:
        """Accumulate ``other`` (e.g. one selection per tensor with ``scope="per_tensor"``)."""
        self.histogram_passes += other.histogram_passes
        self.tie_passes += other.tie_passes
        self.mask_passes += other.mask_passes
        self.compacted = self.compacted or other.compacted
        self.nonfinite.update(other.nonfinite)
        self.selected.update(other.selected)


def pick_bin(counts: torch.Tensor, need: int) -> tuple[int, int, int]:
    """The bin holding the ``need``-th largest key: (digit, keys still needed inside it, keys in it)."""
    host = counts if counts.device.type == "cpu" else counts.cpu()
    bins = np.asarray(host.numpy(), dtype=np.int64)  # host arithmetic on the host copy
    at_or_above = np.cumsum(bins[::-1])[::-1]  # at_or_above[b] = #keys with digit >= b
    candidates = np.flatnonzero(at_or_above >= need)
    if candidates.size == 0:
        raise RuntimeError(
            f"radix select lost elements: need {need} more but only {int(at_or_above[0])} share the prefix"
        )
    digit = int(candidates.max())
    in_bin = int(bins[digit])
    return digit, need - (int(at_or_above[digit]) - in_bin), in_bin


def find_threshold(
    histogram: Callable[[int, int, int, int], torch.Tensor],
    k: int,
    n: int,
    *,
    level: int = 0,
    prefix: int = 0,
) -> tuple[Threshold, int]:
    """Radix-select the threshold of the top ``k`` of ``n`` keys.

    ``histogram(prefix, prefix_shift, digit_shift, digit_bits)`` returns int64 counts of the digit
    ``(key >> digit_shift) & (2^digit_bits - 1)`` over keys with ``key >> prefix_shift == prefix``.
    ``level``/``prefix``: start at digit ``level`` when all ``n`` keys share the digits above it
    (``prefix``), e.g. candidates collected from one top-digit bin. Returns the threshold and the
    number of histogram passes used.
    """
    if k <= 0:
        return Threshold.nothing(), 0
    if k >= n:
        if level == 0:
            return Threshold.everything(), 0
        shift = RADIX_DIGITS[level - 1][0]
        return Threshold((prefix << shift) - 1, 0), 0
    need, passes = k, 0
    for shift, bits in RADIX_DIGITS[level:]:
        counts = histogram(prefix, shift + bits, shift, bits)
        passes += 1
        digit, need, in_bin = pick_bin(counts, need)
        prefix = (prefix << bits) | digit
        if need == in_bin:  # the whole bin is selected: select every key >= its lower bound
            return Threshold((prefix << shift) - 1, 0), passes
    return Threshold(prefix, need), passes


def bincount_histogram(
    keys: Sequence[torch.Tensor],
    prefix: int,
    prefix_shift: int,
    digit_shift: int,
    digit_bits: int,
    chunk: int = 1 << 22,
) -> torch.Tensor:
    """The ``histogram`` of :func:`find_threshold` over int32 key tensors, with ``torch.bincount``.

    Keys outside the prefix are counted in an extra bin that is dropped, so the counts stay on the
    keys' device until the one copy to the host at the end."""
    bins = 1 << digit_bits
    totals: dict[torch.device, torch.Tensor] = {}
    for key in keys:
        for lo in range(0, key.numel(), chunk):
            part = key[lo : lo + chunk]
            digits = ((part >> digit_shift) & (bins - 1)).long()
            if prefix_shift < KEY_BITS:
                digits = torch.where((part >> prefix_shift) == prefix, digits, bins)
            counted = torch.bincount(digits, minlength=bins + 1)[:bins]
            if part.device in totals:
                totals[part.device] += counted
            else:
                totals[part.device] = counted
    counts = np.zeros(bins, dtype=np.int64)  # host arithmetic on the host copies
    for total in totals.values():
        counts += (total if total.device.type == "cpu" else total.cpu()).numpy()
    return torch.from_numpy(counts)


def local_ties(threshold: Threshold, equal_before: int) -> Threshold:
    """The share of ``threshold``'s ties for a part of the keys that has ``equal_before`` keys equal to
    the threshold key before it (by global position): ``clamp(ties - equal_before, 0, ...)``. A sharded
    selection gives each shard its share from an exclusive prefix sum of the shards' ``tie_count``."""
    return Threshold(threshold.key_threshold, max(0, threshold.ties - equal_before))


# ---------------------------------------------------------------------------------------------
# the selector protocol
# ---------------------------------------------------------------------------------------------
@runtime_checkable
class Selector(Protocol):
    """What every selection backend provides, over the sources it was built with (in source order).

    The core is local and reduction-friendly, so a sharded selection can wrap any selector: sum the
    shards' ``histogram`` counts (an all-reduce) and feed the sums to :func:`find_threshold`; sum
    ``nonfinite_counts``; get each shard's tie share from an exclusive prefix sum of the shards'
    ``tie_count`` (:func:`local_ties`, shards in global-position order); then ``write_masks``.

    * ``histogram(prefix, prefix_shift, digit_shift, digit_bits)``: int64 CPU counts, ``2^digit_bits``
      bins, of the digit ``(key >> digit_shift) & (2^digit_bits - 1)`` over this selector's keys with
      ``key >> prefix_shift == prefix`` (:func:`find_threshold`'s histogram);
    * ``tie_count(key)``: how many of this selector's keys equal ``key``;
    * ``write_masks(threshold)``: packed masks (:mod:`wagle_kernels.bitpack`) per source name with bit
      = ``key > T`` or (``key == T`` and among the first ``ties`` equal keys in source order);
    * ``nonfinite_counts()``: NaN/Inf scores per source name;
    * ``select(k, n)``: the masks of the top ``k`` of this selector's ``n`` keys (a backend may take a
      faster route than histogram + write_masks; the result is the same);
    * ``stats``: the :class:`SelectionStats` of everything this selector ran (the one place
      statistics are reported).
    """

    stats: SelectionStats

    def histogram(
        self, prefix: int, prefix_shift: int, digit_shift: int, digit_bits: int
    ) -> torch.Tensor: ...

    def tie_count(self, key: int) -> int: ...

    def write_masks(self, threshold: Threshold) -> dict[str, torch.Tensor]: ...

    def nonfinite_counts(self) -> dict[str, int]: ...

    def select(self, k: int, n: int) -> dict[str, torch.Tensor]: ...


class _RadixSelect:
    """``select`` by the full radix passes: threshold from ``histogram``, then ``write_masks``."""

    stats: SelectionStats

    def select(self, k: int, n: int) -> dict[str, torch.Tensor]:
        threshold, _ = find_threshold(self.histogram, k, n)
        return self.write_masks(threshold)


# ---------------------------------------------------------------------------------------------
# torch backend
# ---------------------------------------------------------------------------------------------
class TorchSelector(_RadixSelect):
    """Reference backend: int32 keys per tensor, ``bincount`` histograms, chunked to bound temporaries."""

    def __init__(
        self,
        sources: Sequence[ScoreSource],
        spec: ScoreSpec,
        chunk: int = 1 << 22,
        device: torch.device | None = None,
    ):
        self.sources = list(sources)
        self.chunk = max(8, chunk - chunk % 8)
        self.device = device
        self.keys: list[torch.Tensor] = []
        self.stats = SelectionStats()
        for src in self.sources:
            device = self.device or self._device(src)
            keys = torch.empty(src.numel, dtype=torch.int32, device=device)
            for lo in range(0, src.numel, self.chunk):
                hi = min(lo + self.chunk, src.numel)
                part = [
                    t[lo:hi].to(device, non_blocking=True) if t is not None else None
                    for t in (src.weight, src.grad_forget, src.grad_retain)
                ]
                scores = scores_torch(
                    spec.method,
                    *part,
                    inv_gamma=spec.inv_gamma,
                    seed=spec.seed,
                    start=src.start + lo,
                    numel=hi - lo,
                )
                keys[lo:hi] = keys_torch(scores)
            self.stats.nonfinite[src.name] = int((keys == 0).sum())
            self.keys.append(keys)

    @staticmethod
    def _device(src: ScoreSource) -> torch.device:
        for t in (src.weight, src.grad_forget, src.grad_retain):
            if t is not None:
                return t.device
        return torch.device("cpu")

    def _chunks(self, keys: torch.Tensor):
        for lo in range(0, keys.numel(), self.chunk):
            yield keys[lo : lo + self.chunk]

    def nonfinite_counts(self) -> dict[str, int]:
        return dict(self.stats.nonfinite)

    def histogram(self, prefix: int, prefix_shift: int, digit_shift: int, digit_bits: int) -> torch.Tensor:
        self.stats.histogram_passes += 1
        return bincount_histogram(self.keys, prefix, prefix_shift, digit_shift, digit_bits, self.chunk)

    def tie_count(self, key: int) -> int:
        return sum(int((part == key).sum()) for keys in self.keys for part in self._chunks(keys))

    def write_masks(self, threshold: Threshold) -> dict[str, torch.Tensor]:
        self.stats.mask_passes += 1
        ties_left = threshold.ties
        t = threshold.key_threshold
        out = {}
        for src, keys in zip(self.sources, self.keys, strict=True):
            packed = torch.empty(packed_size(src.numel), dtype=torch.uint8, device=keys.device)
            set_bits = 0
            for index, part in enumerate(self._chunks(keys)):
                selected = part > t
                if ties_left > 0:
                    equal = part == t
                    count = int(equal.sum())
                    if count <= ties_left:
                        selected |= equal
                    else:
                        selected |= equal & (equal.cumsum(0) <= ties_left)
                    ties_left -= min(count, ties_left)
                lo = index * self.chunk // 8
                packed[lo : lo + packed_size(part.numel())] = pack_bits(selected)
                set_bits += int(selected.sum())
            out[src.name] = packed
            self.stats.selected[src.name] = set_bits
        return out


# ---------------------------------------------------------------------------------------------
# Triton backend
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    from .bitpack import pack_block
    from .scores import key_block, score_block

    # Launch groups. Every score kernel serves up to MAX_TENSORS_PER_LAUNCH tensors per launch: W, GF,
    # GR (inputs), N (numels), START (global positions of element 0), BSTART (first work item), IDX
    # (source index: per-source counters), BYTE_OFF/BIT_BASE (region of the tensor's packed mask in the
    # buffer of all masks) are tuples with one entry per tensor (Triton tuples: no pointer table in
    # memory, so the kernels also run in the interpreter), padded to a power of two with empty entries.
    # Work item ``w`` of a launch is block ``w - BSTART[i]`` of the tensor ``i`` that owns it; per-block
    # buffers (zero-score counts, tie counts, tie offsets) are indexed by ``block_base + w``, the
    # block's index over every source of the selector. The numels are specialised (the JIT compiles a
    # variant for n % 16 == 0): the bounds mask ``offs < n`` is then known to be uniform over 16 lanes
    # and the loads are 128-bit; other n get their own, still exact, variant.
    _NO_SPECIALIZE = [
        *("START", "BSTART", "IDX", "BYTE_OFF", "BIT_BASE", "block_base", "inv_gamma", "seed"),
        *("prefix", "threshold", "ties"),
    ]

    @triton.jit
    def _block_keys(
        w_ptr, gf_ptr, gr_ptr, n, start, block, inv_gamma, seed, METHOD: tl.constexpr, BLOCK: tl.constexpr
    ):
        """Offsets, bounds mask and int32 keys of block ``block`` of one tensor (scores recomputed)."""
        offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n
        key = key_block(score_block(w_ptr, gf_ptr, gr_ptr, offs, valid, start, inv_gamma, seed, METHOD))
        return offs, valid, key

    @triton.jit
    def _store_bits(out_ptr, selected, n, block, BLOCK: tl.constexpr):
        """Bit i % 8 of byte i // 8 of the tensor's packed mask at ``out_ptr``, for one block."""
        byte_offs = block.to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
        tl.store(out_ptr + byte_offs, pack_block(selected, BLOCK), mask=byte_offs < (n + 7) // 8)

    @triton.jit
    def _histogram_block(
        w_ptr,
        gf_ptr,
        gr_ptr,
        nonfinite_ptr,
        zeros_ptr,
        n,
        start,
        block,
        inv_gamma,
        seed,
        prefix,
        PREFIX_SHIFT: tl.constexpr,
        DIGIT_SHIFT: tl.constexpr,
        DIGIT_BITS: tl.constexpr,
        METHOD: tl.constexpr,
        COUNT_NONFINITE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """The digit histogram of one block's keys inside the prefix (see ``_histogram_kernel``)."""
        offs, valid, key = _block_keys(w_ptr, gf_ptr, gr_ptr, n, start, block, inv_gamma, seed, METHOD, BLOCK)
        inside = valid & ((key >> PREFIX_SHIFT) == prefix)
        digit = tl.where(inside, (key >> DIGIT_SHIFT) & ((1 << DIGIT_BITS) - 1), 0)
        hist = tl.histogram(digit, 1 << DIGIT_BITS)
        outside = tl.sum((~inside).to(tl.int32), axis=0)
        if COUNT_NONFINITE:
            bad = tl.sum((valid & (key == 0)).to(tl.int64), axis=0)
            if bad > 0:  # blocks without NaN/Inf scores skip the atomic
                tl.atomic_add(nonfinite_ptr, bad)
            tl.store(zeros_ptr, tl.sum((valid & (key == 1)).to(tl.int64), axis=0))
        bins = tl.arange(0, 1 << DIGIT_BITS)
        return (hist - tl.where(bins == 0, outside, 0)).to(tl.int64)

    @triton.jit(do_not_specialize=_NO_SPECIALIZE)
    def _histogram_kernel(
        W,
        GF,
        GR,
        N,
        START,
        BSTART,
        IDX,
        hist_ptr,
        nonfinite_ptr,
        zeros_ptr,
        block_base,
        inv_gamma,
        seed,
        prefix,
        programs,
        iterations,
        PREFIX_SHIFT: tl.constexpr,
        DIGIT_SHIFT: tl.constexpr,
        DIGIT_BITS: tl.constexpr,
        METHOD: tl.constexpr,
        COUNT_NONFINITE: tl.constexpr,
        NUM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """hist[d] += #{i : key_i >> PREFIX_SHIFT == prefix and (key_i >> DIGIT_SHIFT) & (2^B - 1) == d}
        over the ``NUM`` tensors of the launch.

        key_i = bits(S_i) + 1 (0 when S_i is not finite), S_i recomputed from the inputs. Keys outside
        the prefix are counted in bin 0 by ``tl.histogram`` and subtracted again, so no masked
        histogram is needed. Persistent: program pid walks work items pid, pid + P, ... (P =
        ``programs``, ``iterations`` = ceil(items / P)) and adds its private histogram to the global one
        once, so a launch makes P * 2^B global atomics instead of one histogram per block.

        With COUNT_NONFINITE (the first pass) it also adds each tensor's non-finite scores (key 0) to
        ``nonfinite_ptr[IDX[i]]`` and stores each block's count of exactly-zero scores (key 1) at
        ``zeros_ptr[block_base + w]``: the rank offsets of the zero-score tie, the common huge tie.
        """
        pid = tl.program_id(0)
        total = tl.zeros((1 << DIGIT_BITS,), tl.int64)
        it = 0
        while it < iterations:  # a while loop: the interpreter cannot range() over a scalar argument
            item = pid + it * programs
            for i in tl.static_range(NUM):
                block = item - BSTART[i]
                if (block >= 0) & (block.to(tl.int64) * BLOCK < N[i]):
                    total += _histogram_block(
                        W[i],
                        GF[i],
                        GR[i],
                        nonfinite_ptr + IDX[i],
                        zeros_ptr + block_base + item,
                        N[i],
                        START[i],
                        block,
                        inv_gamma,
                        seed,
                        prefix,
                        PREFIX_SHIFT=PREFIX_SHIFT,
                        DIGIT_SHIFT=DIGIT_SHIFT,
                        DIGIT_BITS=DIGIT_BITS,
                        METHOD=METHOD,
                        COUNT_NONFINITE=COUNT_NONFINITE,
                        BLOCK=BLOCK,
                    )
            it += 1
        tl.atomic_add(hist_ptr + tl.arange(0, 1 << DIGIT_BITS), total)

    @triton.jit(do_not_specialize=_NO_SPECIALIZE)
    def _tie_count_kernel(
        W,
        GF,
        GR,
        N,
        START,
        BSTART,
        counts_ptr,
        block_base,
        inv_gamma,
        seed,
        threshold,
        METHOD: tl.constexpr,
        NUM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """counts[block_base + w] = #{i in work item w : key_i == threshold} (the block's share of the
        tied keys)."""
        item = tl.program_id(0)
        for i in tl.static_range(NUM):
            block = item - BSTART[i]
            if (block >= 0) & (block.to(tl.int64) * BLOCK < N[i]):
                _, valid, key = _block_keys(
                    W[i], GF[i], GR[i], N[i], START[i], block, inv_gamma, seed, METHOD, BLOCK
                )
                tl.store(
                    counts_ptr + block_base + item, tl.sum((valid & (key == threshold)).to(tl.int64), axis=0)
                )

    @triton.jit
    def _mask_block(
        w_ptr,
        gf_ptr,
        gr_ptr,
        out_ptr,
        tie_offset_ptr,
        count_ptr,
        n,
        start,
        block,
        inv_gamma,
        seed,
        threshold,
        ties,
        METHOD: tl.constexpr,
        HAS_TIES: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One block of ``_mask_kernel``."""
        offs, valid, key = _block_keys(w_ptr, gf_ptr, gr_ptr, n, start, block, inv_gamma, seed, METHOD, BLOCK)
        selected = valid & (key > threshold)
        if HAS_TIES:
            equal = valid & (key == threshold)
            equal_count = equal.to(tl.int32)
            before = tl.cumsum(equal_count, axis=0) - equal_count
            rank = tl.load(tie_offset_ptr) + before.to(tl.int64)
            selected = selected | (equal & (rank < ties))
        tl.atomic_add(count_ptr, tl.sum(selected.to(tl.int64), axis=0))
        _store_bits(out_ptr, selected, n, block, BLOCK)

    @triton.jit(do_not_specialize=_NO_SPECIALIZE)
    def _mask_kernel(
        W,
        GF,
        GR,
        N,
        START,
        BSTART,
        IDX,
        BYTE_OFF,
        out_ptr,
        tie_offset_ptr,
        count_ptr,
        block_base,
        inv_gamma,
        seed,
        threshold,
        ties,
        METHOD: tl.constexpr,
        HAS_TIES: tl.constexpr,
        NUM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """bit_i = key_i > T or (key_i == T and rank_i < ties), packed into tensor i's region
        ``out_ptr + BYTE_OFF[i]``; each block's number of set bits is added to ``count_ptr[IDX[i]]``.

        rank_i = (# keys equal to T before this block, over all tensors in order: the exclusive offset
        ``tie_offset_ptr[block_base + w]``) + (# before i in the block).
        """
        item = tl.program_id(0)
        for i in tl.static_range(NUM):
            block = item - BSTART[i]
            if (block >= 0) & (block.to(tl.int64) * BLOCK < N[i]):
                _mask_block(
                    W[i],
                    GF[i],
                    GR[i],
                    out_ptr + BYTE_OFF[i],
                    tie_offset_ptr + block_base + item,
                    count_ptr + IDX[i],
                    N[i],
                    START[i],
                    block,
                    inv_gamma,
                    seed,
                    threshold,
                    ties,
                    METHOD=METHOD,
                    HAS_TIES=HAS_TIES,
                    BLOCK=BLOCK,
                )

    @triton.jit
    def _mask_compact_block(
        w_ptr,
        gf_ptr,
        gr_ptr,
        out_ptr,
        cand_key_ptr,
        cand_bit_ptr,
        counter_ptr,
        count_ptr,
        n,
        start,
        bit_base,
        block,
        inv_gamma,
        seed,
        low,
        high,
        capacity,
        METHOD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One block of ``_mask_compact_kernel``."""
        offs, valid, key = _block_keys(w_ptr, gf_ptr, gr_ptr, n, start, block, inv_gamma, seed, METHOD, BLOCK)
        selected = valid & (key > high)
        candidate = valid & (key >= low) & (key <= high)
        flags = candidate.to(tl.int32)
        count = tl.sum(flags, axis=0)
        if count > 0:  # blocks without candidates skip the (same-address) atomic
            base = tl.atomic_add(counter_ptr, count.to(tl.int64))
            slot = base + (tl.cumsum(flags, axis=0) - flags).to(tl.int64)
            keep = candidate & (slot < capacity)
            tl.store(cand_key_ptr + slot, key, mask=keep)
            tl.store(cand_bit_ptr + slot, bit_base + offs, mask=keep)
        tl.atomic_add(count_ptr, tl.sum(selected.to(tl.int64), axis=0))
        _store_bits(out_ptr, selected, n, block, BLOCK)

    @triton.jit(do_not_specialize=_NO_SPECIALIZE + ["low", "high", "capacity"])
    def _mask_compact_kernel(
        W,
        GF,
        GR,
        N,
        START,
        BSTART,
        IDX,
        BYTE_OFF,
        BIT_BASE,
        out_ptr,
        cand_key_ptr,
        cand_bit_ptr,
        counter_ptr,
        count_ptr,
        inv_gamma,
        seed,
        low,
        high,
        capacity,
        METHOD: tl.constexpr,
        NUM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One pass that settles every key outside the threshold bin [low, high] and collects the rest.

        bit_i = key_i > high (packed as in ``_mask_kernel``, counted into ``count_ptr[IDX[i]]``); keys
        with low <= key_i <= high are appended as (key_i, BIT_BASE[i] + i) to the candidate buffers at
        slots reserved per block with one atomic add. ``BIT_BASE[i] + i`` is the element's bit in the
        buffer of all packed masks (regions in tensor order), so it orders candidates like global
        positions.
        """
        item = tl.program_id(0)
        for i in tl.static_range(NUM):
            block = item - BSTART[i]
            if (block >= 0) & (block.to(tl.int64) * BLOCK < N[i]):
                _mask_compact_block(
                    W[i],
                    GF[i],
                    GR[i],
                    out_ptr + BYTE_OFF[i],
                    cand_key_ptr,
                    cand_bit_ptr,
                    counter_ptr,
                    count_ptr + IDX[i],
                    N[i],
                    START[i],
                    BIT_BASE[i],
                    block,
                    inv_gamma,
                    seed,
                    low,
                    high,
                    capacity,
                    METHOD=METHOD,
                    BLOCK=BLOCK,
                )

    @triton.jit
    def _set_bits_kernel(words_ptr, bit_ptr, m, BLOCK: tl.constexpr):
        """words[b >> 5] |= 1 << (b & 31) for each bit index b (int32 words, little-endian bytes)."""
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < m
        bit = tl.load(bit_ptr + offs, mask=valid, other=0)
        value = (tl.full(offs.shape, 1, tl.uint32) << (bit & 31).to(tl.uint32)).to(tl.int32, bitcast=True)
        tl.atomic_or(words_ptr + (bit >> 5), value, mask=valid)

    @triton.jit(do_not_specialize=["prefix"])
    def _key_histogram_kernel(
        key_ptr,
        hist_ptr,
        m,
        prefix,
        programs,
        iterations,
        PREFIX_SHIFT: tl.constexpr,
        DIGIT_SHIFT: tl.constexpr,
        DIGIT_BITS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """``_histogram_kernel`` over ``m`` stored int32 keys (the collected candidates)."""
        pid = tl.program_id(0)
        bins = tl.arange(0, 1 << DIGIT_BITS)
        total = tl.zeros((1 << DIGIT_BITS,), tl.int64)
        it = 0
        while it < iterations:
            offs = (pid + it * programs).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            valid = offs < m
            key = tl.load(key_ptr + offs, mask=valid, other=0)
            inside = valid & ((key >> PREFIX_SHIFT) == prefix)
            digit = tl.where(inside, (key >> DIGIT_SHIFT) & ((1 << DIGIT_BITS) - 1), 0)
            hist = tl.histogram(digit, 1 << DIGIT_BITS)
            outside = tl.sum((~inside).to(tl.int32), axis=0)
            total += (hist - tl.where(bins == 0, outside, 0)).to(tl.int64)
            it += 1
        tl.atomic_add(hist_ptr + bins, total)

    @triton.jit(do_not_specialize=["threshold"])
    def _candidate_bits_kernel(
        key_ptr,
        bit_ptr,
        words_ptr,
        region_ptr,
        count_ptr,
        tie_ptr,
        tie_counter_ptr,
        m,
        regions,
        threshold,
        HAS_TIES: tl.constexpr,
        LOG2_REGIONS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Settle candidates: key > threshold sets its bit (``words[b >> 5] |= 1 << (b & 31)``) and adds
        one to its tensor's count (owner found by a binary search over the ``regions`` sorted first
        bits at ``region_ptr``); with HAS_TIES, keys equal to the threshold are appended to ``tie_ptr``
        for the host to pick the lowest positions."""
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < m
        key = tl.load(key_ptr + offs, mask=valid, other=0)
        bit = tl.load(bit_ptr + offs, mask=valid, other=0)
        chosen = valid & (key > threshold)
        value = (tl.full(offs.shape, 1, tl.uint32) << (bit & 31).to(tl.uint32)).to(tl.int32, bitcast=True)
        tl.atomic_or(words_ptr + (bit >> 5), value, mask=chosen)
        owner = tl.zeros(offs.shape, tl.int32)
        for j in tl.static_range(LOG2_REGIONS):
            probe = owner + (1 << (LOG2_REGIONS - 1 - j))
            inside = chosen & (probe < regions)
            first_bit = tl.load(region_ptr + probe, mask=inside, other=0)
            owner = tl.where(inside & (first_bit <= bit), probe, owner)
        tl.atomic_add(count_ptr + owner, tl.full(offs.shape, 1, tl.int64), mask=chosen)
        if HAS_TIES:
            equal = valid & (key == threshold)
            flags = equal.to(tl.int32)
            count = tl.sum(flags, axis=0)
            if count > 0:
                base = tl.atomic_add(tie_counter_ptr, count.to(tl.int64))
                slot = base + (tl.cumsum(flags, axis=0) - flags).to(tl.int64)
                tl.store(tie_ptr + slot, bit, mask=equal)


# The compile-check type of every selection kernel argument (by name; other upper-case names are
# constexprs): bf16 inputs with an fp32 retain gradient, the numel types the JIT picks below 2^31
# elements. Tuple arguments (one entry per tensor of a launch group) have their element type here.
COMPILE_ARG_TYPES = {
    **{"out_ptr": "*u8", "words_ptr": "*i32", "cand_key_ptr": "*i32", "key_ptr": "*i32"},
    **dict.fromkeys(
        ("hist_ptr", "nonfinite_ptr", "zeros_ptr", "counts_ptr", "tie_offset_ptr", "count_ptr"), "*i64"
    ),
    **dict.fromkeys(
        ("cand_bit_ptr", "counter_ptr", "bit_ptr", "region_ptr", "tie_ptr", "tie_counter_ptr"), "*i64"
    ),
    **dict.fromkeys(
        ("m", "seed", "prefix", "programs", "iterations", "threshold", "low", "high", "block_base"), "i32"
    ),
    **dict.fromkeys(("regions",), "i32"),
    **dict.fromkeys(("ties", "capacity"), "i64"),
    "inv_gamma": "fp32",
}
COMPILE_TUPLE_TYPES = {
    **{"W": "*bf16", "GF": "*bf16", "GR": "*fp32"},
    **dict.fromkeys(("N", "BSTART", "IDX", "BYTE_OFF"), "i32"),
    **dict.fromkeys(("START", "BIT_BASE"), "i64"),
}


def kernel_signature(
    kernel,
    num: int = 1,
    types: dict[str, str] = COMPILE_ARG_TYPES,
    tuple_types: dict[str, str] = COMPILE_TUPLE_TYPES,
) -> dict[str, str | tuple[str, ...]]:
    """``{argument: type, (type,) * num or "constexpr"}`` of ``kernel`` in argument order, from its own
    parameters, for launch groups of ``num`` tensors."""
    import inspect

    fn = getattr(kernel, "fn", kernel)
    signature: dict[str, str | tuple[str, ...]] = {}
    for name in inspect.signature(fn).parameters:
        if name in tuple_types:
            signature[name] = (tuple_types[name],) * num
        elif name.isupper():
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
        else:
            raise KeyError(f"kernel_signature: no compile type for argument {name!r} of {fn.__name__}")
    return signature


def compile_variants(block: int = 4096, num: int = 2, wide: int = MAX_TENSORS_PER_LAUNCH):
    """``(label, kernel, signature, constexprs, attrs)`` of every selection kernel variant, for
    ahead-of-time compile checks (``tests/compile_kernels.py``): launch groups of ``num`` tensors for
    the first-digit histogram of every registered score method and the other kernels for ``wagle``,
    plus the two kernels of the common two-pass selection with ``wide`` tensors per launch (labelled
    ``x{wide}``). ``attrs`` are the JIT's specialisation of 16-byte aligned pointers (what ``torch``
    allocations give) and of numels that are multiples of 16 (Llama-2's sizes)."""
    wagle = SCORE_METHODS["wagle"].kernel_id
    (top_shift, top_bits), (mid_shift, mid_bits), (last_shift, last_bits) = RADIX_DIGITS
    first_digit = {"PREFIX_SHIFT": KEY_BITS, "DIGIT_SHIFT": top_shift, "DIGIT_BITS": top_bits}
    last_digit = {"PREFIX_SHIFT": last_shift + last_bits, "DIGIT_SHIFT": last_shift, "DIGIT_BITS": last_bits}
    first = {**first_digit, "METHOD": wagle, "COUNT_NONFINITE": True, "BLOCK": block}
    variants = [
        (
            f"histogram method={name} x{num}",
            _histogram_kernel,
            {**first, "METHOD": m.kernel_id, "NUM": num},
        )
        for name, m in SCORE_METHODS.items()
    ]
    variants += [
        (
            f"histogram last digit x{num}",
            _histogram_kernel,
            {**last_digit, "METHOD": wagle, "COUNT_NONFINITE": False, "NUM": num, "BLOCK": block},
        ),
        (f"tie count x{num}", _tie_count_kernel, {"METHOD": wagle, "NUM": num, "BLOCK": block}),
        *(
            (
                f"mask ties={ties} x{num}",
                _mask_kernel,
                {"METHOD": wagle, "HAS_TIES": ties, "NUM": num, "BLOCK": block},
            )
            for ties in (False, True)
        ),
        (f"mask + candidates x{num}", _mask_compact_kernel, {"METHOD": wagle, "NUM": num, "BLOCK": block}),
        (f"histogram x{wide}", _histogram_kernel, {**first, "NUM": wide}),
        (f"mask + candidates x{wide}", _mask_compact_kernel, {"METHOD": wagle, "NUM": wide, "BLOCK": block}),
        ("set bits", _set_bits_kernel, {"BLOCK": block}),
        (
            "candidate histogram",
            _key_histogram_kernel,
            {
                "PREFIX_SHIFT": mid_shift + mid_bits,
                "DIGIT_SHIFT": mid_shift,
                "DIGIT_BITS": mid_bits,
                "BLOCK": block,
            },
        ),
        ("candidate bits", _candidate_bits_kernel, {"HAS_TIES": True, "LOG2_REGIONS": 9, "BLOCK": block}),
    ]
    for label, fn, constexprs in variants:
        signature = kernel_signature(fn, constexprs.get("NUM", 1))
        yield label, fn, signature, constexprs, aligned_attrs(signature, tuples=("N",))


@dataclass(frozen=True)
class LaunchGroup:
    """Consecutive non-empty sources served by one launch per pass: their indices, the first work item
    (block) of each within the launch, the launch's work items, and ``block_base``, the index of the
    group's first block over all sources (per-block buffers are indexed by ``block_base + item``)."""

    indices: tuple[int, ...]
    first_items: tuple[int, ...]
    items: int
    block_base: int


def plan_launch_groups(
    numels: Sequence[int], block: int, max_tensors: int, alone: Sequence[bool] | None = None
) -> list[LaunchGroup]:
    """Cut the sources (in order) into launch groups of at most ``max_tensors`` non-empty tensors; a
    source flagged in ``alone`` (inputs copied to the device per launch) gets a group of its own, which
    bounds the memory of the copy. Launches per pass: ``ceil(tensors / max_tensors)`` plus one per such
    source."""
    if max_tensors < 1:
        raise ValueError(f"max_tensors: must be >= 1, got {max_tensors}")
    blocks = [(n + block - 1) // block for n in numels]
    base = np.concatenate([[0], np.cumsum(blocks, dtype=np.int64)]).tolist() if blocks else [0]
    groups: list[LaunchGroup] = []
    current: list[int] = []

    def close() -> None:
        if current:
            first = base[current[0]]
            items = tuple(base[i] - first for i in current)
            groups.append(LaunchGroup(tuple(current), items, base[current[-1] + 1] - first, first))
            current.clear()

    for index, n in enumerate(numels):
        if n == 0:
            continue
        if alone is not None and alone[index]:
            close()
            current.append(index)
            close()
            continue
        current.append(index)
        if len(current) == max_tensors:
            close()
    close()
    return groups


class TritonSelector(_RadixSelect):
    """Kernel backend: every pass recomputes scores from the inputs; one launch per group of up to
    ``max_tensors`` tensors per pass (:func:`plan_launch_groups`), so a selection over ``T`` tensors
    makes ``passes * ceil(T / max_tensors)`` score-kernel launches plus a constant few on the candidates.

    Host syncs per selection are constant: one after the first histogram pass (bins, non-finite and
    zero-score counts together), at most three while resolving candidates, one for the per-tensor
    selected counts.
    """

    def __init__(
        self,
        sources: Sequence[ScoreSource],
        spec: ScoreSpec,
        block: int = 4096,
        num_warps: int = 8,
        candidate_fraction: float = 1 / 32,
        device: torch.device | None = None,
        max_programs: int | None = None,
        max_tensors: int = MAX_TENSORS_PER_LAUNCH,
    ):
        if not HAS_TRITON:
            raise RuntimeError("TritonSelector: triton is not installed")
        self.sources = list(sources)
        self.spec = spec
        self.block = block
        self.num_warps = num_warps
        self.method_id = get_method(spec.method).kernel_id
        self.device = device or self._device()
        self.stats = SelectionStats()
        self._counted_nonfinite = False
        self._cache: tuple[tuple[int, int, int, int], np.ndarray] | None = None  # the last pass, on the host
        self._zero_flat: torch.Tensor | None = None  # zero-score count per block, all sources in order
        self._zeros = 0  # exactly-zero scores (key 1) over all sources
        self.candidate_fraction = candidate_fraction
        if max_programs is None:  # persistent histogram programs: a few per SM on a GPU
            cuda = self.device.type == "cuda"
            max_programs = (
                4 * torch.cuda.get_device_properties(self.device).multi_processor_count if cuda else 4
            )
        self.max_programs = max(1, max_programs)
        self._total_blocks = sum(self._blocks(src) for src in self.sources)
        self._region_offsets, total = [], 0  # packed masks: one buffer, regions 4-byte aligned
        for src in self.sources:
            self._region_offsets.append(total)
            total += (packed_size(src.numel) + 3) // 4 * 4
        self._region_bytes = max(total, 4)
        self.groups = plan_launch_groups(
            [src.numel for src in self.sources],
            block,
            max_tensors,
            alone=[not self._resident(src) for src in self.sources],
        )
        self._placeholder: torch.Tensor | None = None

    def _device(self) -> torch.device:
        for src in self.sources:
            for t in (src.weight, src.grad_forget, src.grad_retain):
                if t is not None:
                    return t.device
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    def _resident(self, src: ScoreSource) -> bool:
        """Whether every input of ``src`` already lives on the selector's device."""
        for t in (src.weight, src.grad_forget, src.grad_retain):
            if t is None:
                continue
            if t.device.type != self.device.type:
                return False
            if self.device.index is not None and t.device.index != self.device.index:
                return False
        return True

    def _inputs(self, src: ScoreSource) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # inputs kept in host memory (host_gradients) are copied to the device for this launch only
        moved = [
            t.to(self.device, non_blocking=True) if t is not None else None
            for t in (src.weight, src.grad_forget, src.grad_retain)
        ]
        present = [t for t in moved if t is not None]
        if present:
            placeholder = present[0]
        else:
            if self._placeholder is None:
                self._placeholder = torch.empty(1, dtype=torch.float32, device=self.device)
            placeholder = self._placeholder
        return tuple(t if t is not None else placeholder for t in moved)

    def _group_args(self, group: LaunchGroup, names: Sequence[str]) -> tuple[list[tuple], int]:
        """The tuple arguments ``names`` of one launch (padded to a power of two with empty entries),
        in that order, and the padded size (the kernels' NUM)."""
        size = padded_size(len(group.indices))
        inputs = [self._inputs(self.sources[i]) for i in group.indices]
        srcs = [self.sources[i] for i in group.indices]
        regions = [self._region_offsets[i] for i in group.indices]
        values = {
            "W": ([x[0] for x in inputs], inputs[0][0]),
            "GF": ([x[1] for x in inputs], inputs[0][1]),
            "GR": ([x[2] for x in inputs], inputs[0][2]),
            "N": ([src.numel for src in srcs], 0),
            "START": ([src.start for src in srcs], 0),
            "BSTART": (group.first_items, 0),
            "IDX": (group.indices, 0),
            "BYTE_OFF": (regions, 0),
            "BIT_BASE": ([8 * r for r in regions], 0),
        }
        return [pad(values[name][0], size, values[name][1]) for name in names], size

    def _blocks(self, src: ScoreSource) -> int:
        return triton.cdiv(src.numel, self.block)

    def _block_buffer(self) -> torch.Tensor:
        """One int64 counter per block of every source, in source order (zeroed)."""
        return torch.zeros(max(1, self._total_blocks), dtype=torch.int64, device=self.device)

    def histogram(self, prefix: int, prefix_shift: int, digit_shift: int, digit_bits: int) -> torch.Tensor:
        args = (prefix, prefix_shift, digit_shift, digit_bits)
        if self._cache is not None and self._cache[0] == args:
            return torch.from_numpy(self._cache[1].copy())
        first = not self._counted_nonfinite
        bins = 1 << digit_bits
        # bins, then per source its non-finite count, then the total of zero-score keys
        counts = torch.zeros(bins + len(self.sources) + 1, dtype=torch.int64, device=self.device)
        zeros_flat = self._block_buffer() if first else counts
        self.stats.histogram_passes += 1
        for group in self.groups:
            tuples, num = self._group_args(group, ("W", "GF", "GR", "N", "START", "BSTART", "IDX"))
            programs = min(group.items, self.max_programs)
            _histogram_kernel[(programs,)](
                *tuples,
                counts,
                counts[bins:],
                zeros_flat,
                group.block_base,
                self.spec.inv_gamma,
                self.spec.seed,
                prefix,
                programs,
                triton.cdiv(group.items, programs),
                PREFIX_SHIFT=prefix_shift,
                DIGIT_SHIFT=digit_shift,
                DIGIT_BITS=digit_bits,
                METHOD=self.method_id,
                COUNT_NONFINITE=first,
                NUM=num,
                BLOCK=self.block,
                num_warps=self.num_warps,
                **launch_options(),
            )
        if first:
            counts[-1] = zeros_flat.sum()
        host = counts.cpu().numpy().copy()  # the pass's one host sync; host arithmetic in numpy
        if first:
            nonfinite = host[bins : bins + len(self.sources)]
            self.stats.nonfinite = {src.name: int(nonfinite[i]) for i, src in enumerate(self.sources)}
            self._zero_flat = zeros_flat[: self._total_blocks]
            self._zeros = int(host[-1])
            self._counted_nonfinite = True
        self._cache = (args, host[:bins])
        return torch.from_numpy(host[:bins].copy())

    def nonfinite_counts(self) -> dict[str, int]:
        """Run the first histogram pass if none ran yet (it also counts non-finite scores per tensor)."""
        if not self._counted_nonfinite:
            self.histogram(0, KEY_BITS, RADIX_DIGITS[0][0], RADIX_DIGITS[0][1])
        return dict(self.stats.nonfinite)

    def select(self, k: int, n: int) -> dict[str, torch.Tensor]:
        """Two passes over the inputs whenever the first histogram allows (module docstring), else the
        full radix passes."""
        if 0 < k < n:
            shift, bits = RADIX_DIGITS[0]
            digit, need, in_bin = pick_bin(self.histogram(0, KEY_BITS, shift, bits), k)
            if digit == 0 and need < in_bin:  # the bin of the lowest keys: zero scores and NaN/Inf
                masks = self._select_lowest_bin(need, in_bin)
                if masks is not None:
                    return masks
            masks = self.select_compact(k, n)
            if masks is not None:
                return masks
        return super().select(k, n)

    def _select_lowest_bin(self, need: int, in_bin: int) -> dict[str, torch.Tensor] | None:
        """The threshold lies in the lowest top-digit bin, which holds the exactly-zero scores (key 1,
        often a huge tie) and the non-finite ones (key 0). With ``positive`` keys >= 2 in the bin:

        * need <= positive: the candidates are the positive keys alone (the zeros are never collected);
        * positive < need <= positive + zeros: every key >= 2 plus the first ``need - positive`` zero
          scores by position, one mask pass with the zero counts per block of the first pass as tie
          offsets (no tie pass).

        Returns None where neither applies (the threshold among the non-finite scores).
        """
        nonfinite = sum(self.stats.nonfinite.values())
        positive = in_bin - self._zeros - nonfinite
        if need <= positive:
            return self.select_compact_range(2, (1 << RADIX_DIGITS[0][0]) - 1, need, positive)
        if need <= positive + self._zeros:
            return self._mask_pass(Threshold(1, need - positive), _exclusive(self._zero_flat))
        return None

    def _packed_regions(self) -> torch.Tensor:
        """One uint8 buffer for all packed masks, source ``i``'s region at byte
        ``_region_offsets[i]`` (left uninitialised: every mask pass writes every byte of every region
        before any atomic OR)."""
        return torch.empty(self._region_bytes, dtype=torch.uint8, device=self.device)

    def _views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            src.name: buffer[offset : offset + packed_size(src.numel)]
            for src, offset in zip(self.sources, self._region_offsets, strict=True)
        }

    def select_compact(self, k: int, n: int) -> dict[str, torch.Tensor] | None:
        """Two passes over the inputs when the threshold bin of the first digit is small.

        Pass 1 histograms the top digit; pass 2 writes the bits of keys above the threshold bin and
        collects the keys inside it (at most ``candidate_fraction * n``) with their positions; the
        remaining digits and the tie-break are resolved on the candidates alone. Returns None (and
        the caller falls back to the full radix passes) when the bin is larger than that.
        """
        if not 0 < k < n or self.candidate_fraction <= 0:
            return None
        shift, bits = RADIX_DIGITS[0]
        digit, need, in_bin = pick_bin(self.histogram(0, KEY_BITS, shift, bits), k)
        if need == in_bin:
            return None
        return self.select_compact_range(digit << shift, ((digit + 1) << shift) - 1, need, in_bin)

    def select_compact_range(
        self, low: int, high: int, need: int, in_range: int
    ) -> dict[str, torch.Tensor] | None:
        """Select every key above ``high`` and the top ``need`` of the ``in_range`` keys in
        ``[low, high]`` (one top-digit bin, collected as candidates); None when they do not fit the
        candidate buffer.

        Candidates are (key, bit index in the buffer of all masks); bit indices order like global
        positions. The lower digits are histogrammed over the candidates' keys (4 bytes each per
        digit), one kernel sets the bits of the candidates above the threshold and counts them per
        tensor, and only the candidates equal to the threshold (the tie) are ranked by position.
        """
        n = sum(src.numel for src in self.sources)
        capacity = int(self.candidate_fraction * n) + 1024
        if self.candidate_fraction <= 0 or in_range > capacity:
            return None
        buffer = self._packed_regions()
        cand_keys = torch.empty(max(in_range, 1), dtype=torch.int32, device=self.device)
        cand_bits = torch.empty(max(in_range, 1), dtype=torch.int64, device=self.device)
        # the candidate counter, the tie counter, then the selected bits per source
        counters = torch.zeros(2 + len(self.sources), dtype=torch.int64, device=self.device)
        for group in self.groups:
            tuples, num = self._group_args(
                group, ("W", "GF", "GR", "N", "START", "BSTART", "IDX", "BYTE_OFF", "BIT_BASE")
            )
            _mask_compact_kernel[(group.items,)](
                *tuples,
                buffer,
                cand_keys,
                cand_bits,
                counters,
                counters[2:],
                self.spec.inv_gamma,
                self.spec.seed,
                low,
                high,
                in_range,
                METHOD=self.method_id,
                NUM=num,
                BLOCK=self.block,
                num_warps=self.num_warps,
                **launch_options(),
            )
        self.stats.mask_passes += 1
        self.stats.compacted = True
        top = low >> RADIX_DIGITS[0][0]
        threshold, _ = find_threshold(
            self._candidate_histogram(cand_keys, in_range), need, in_range, level=1, prefix=top
        )
        offsets = self._region_offsets
        regions = torch.tensor([offset * 8 for offset in offsets], dtype=torch.int64, device=self.device)
        tied = torch.empty(max(in_range, 1) if threshold.ties else 1, dtype=torch.int64, device=self.device)
        if in_range:
            _candidate_bits_kernel[(triton.cdiv(in_range, self.block),)](
                cand_keys,
                cand_bits,
                buffer.view(torch.int32),
                regions,
                counters[2:],
                tied,
                counters[1:],
                in_range,
                len(self.sources),
                threshold.key_threshold,
                HAS_TIES=threshold.ties > 0,
                LOG2_REGIONS=max(1, (len(self.sources) - 1).bit_length()),
                BLOCK=self.block,
                num_warps=self.num_warps,
            )
        if threshold.ties:  # the tie: the lowest positions among the candidates equal to the threshold
            last_shift, last_bits = RADIX_DIGITS[-1]
            equal = int(self._last_hist[(threshold.key_threshold >> last_shift) & ((1 << last_bits) - 1)])
            chosen = torch.topk(tied[:equal], threshold.ties, largest=False).values
            owner = torch.searchsorted(regions, chosen, right=True) - 1
            counters[2:] += torch.bincount(owner, minlength=len(self.sources))
            _set_bits_kernel[(triton.cdiv(chosen.numel(), self.block),)](
                buffer.view(torch.int32), chosen, chosen.numel(), BLOCK=self.block, num_warps=self.num_warps
            )
        host = counters.tolist()  # one sync: candidate count and the selected bits per source
        if host[0] != in_range:
            raise RuntimeError(
                f"candidate pass found {host[0]} keys in the threshold bin, expected {in_range}"
            )
        self.stats.selected = {src.name: int(host[2 + i]) for i, src in enumerate(self.sources)}
        return self._views(buffer)

    def _candidate_histogram(self, keys: torch.Tensor, m: int):
        """``find_threshold``'s histogram over the first ``m`` candidate keys (one sync per digit); it
        remembers the count of the bin it last reported (the tie size at the last digit)."""

        def histogram(prefix: int, prefix_shift: int, digit_shift: int, digit_bits: int) -> torch.Tensor:
            hist = torch.zeros(1 << digit_bits, dtype=torch.int64, device=self.device)
            blocks = max(1, triton.cdiv(m, self.block))
            programs = min(blocks, self.max_programs)
            _key_histogram_kernel[(programs,)](
                keys,
                hist,
                m,
                prefix,
                programs,
                triton.cdiv(blocks, programs),
                PREFIX_SHIFT=prefix_shift,
                DIGIT_SHIFT=digit_shift,
                DIGIT_BITS=digit_bits,
                BLOCK=self.block,
                num_warps=self.num_warps,
            )
            host = hist.cpu().numpy().copy()
            self._last_hist = host
            return torch.from_numpy(host)

        return histogram

    def _tie_counts_per_block(self, key: int) -> torch.Tensor:
        """One tie pass: the number of keys equal to ``key`` in each block, all sources in order."""
        self.stats.tie_passes += 1
        counts = self._block_buffer()
        for group in self.groups:
            tuples, num = self._group_args(group, ("W", "GF", "GR", "N", "START", "BSTART"))
            _tie_count_kernel[(group.items,)](
                *tuples,
                counts,
                group.block_base,
                self.spec.inv_gamma,
                self.spec.seed,
                key,
                METHOD=self.method_id,
                NUM=num,
                BLOCK=self.block,
                num_warps=self.num_warps,
                **launch_options(),
            )
        return counts[: self._total_blocks]

    def tie_count(self, key: int) -> int:
        if key == 1 and self._zero_flat is not None:  # the first pass counted the zero scores
            return self._zeros
        return int(self._tie_counts_per_block(key).sum())

    def write_masks(self, threshold: Threshold) -> dict[str, torch.Tensor]:
        offsets = None
        if threshold.ties > 0:
            if threshold.key_threshold == 1 and self._zero_flat is not None:
                per_block = self._zero_flat  # zero-score counts per block from the first pass
            else:
                per_block = self._tie_counts_per_block(threshold.key_threshold)
            offsets = _exclusive(per_block)
        return self._mask_pass(threshold, offsets)

    def _mask_pass(self, threshold: Threshold, tie_offsets: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One mask pass for ``threshold``; ``tie_offsets``: per block (all sources in order), the
        exclusive rank offset of the block among the keys equal to the threshold (needed when
        ``threshold.ties > 0``)."""
        self.stats.mask_passes += 1
        counts = torch.zeros(max(1, len(self.sources)), dtype=torch.int64, device=self.device)
        buffer = self._packed_regions()
        has_ties = tie_offsets is not None and threshold.ties > 0
        for group in self.groups:
            tuples, num = self._group_args(
                group, ("W", "GF", "GR", "N", "START", "BSTART", "IDX", "BYTE_OFF")
            )
            _mask_kernel[(group.items,)](
                *tuples,
                buffer,
                tie_offsets if has_ties else counts,
                counts,
                group.block_base,
                self.spec.inv_gamma,
                self.spec.seed,
                threshold.key_threshold,
                threshold.ties,
                METHOD=self.method_id,
                HAS_TIES=has_ties,
                NUM=num,
                BLOCK=self.block,
                num_warps=self.num_warps,
                **launch_options(),
            )
        host = counts.tolist()  # one sync for every tensor's selected count
        self.stats.selected = {src.name: int(host[i]) for i, src in enumerate(self.sources)}
        return self._views(buffer)


def _exclusive(counts: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sums of per-block counts (each block's rank offset)."""
    return counts.cumsum(0) - counts


def select_top_k(
    selector: Selector, k: int, n: int, stats: SelectionStats | None = None
) -> dict[str, torch.Tensor]:
    """Packed masks of the top ``k`` of ``n`` keys by ``selector``; its statistics are added to
    ``stats`` when given (they are always in ``selector.stats``)."""
    masks = selector.select(k, n)
    if stats is not None:
        stats.add(selector.stats)
    return masks
