"""Reading bit-packed masks inside kernels, and the compact-state index metadata.

Compact optimizer state stores moments only for selected weights, in flat order. The compact index
of a selected element i is the number of selected elements before it:
``index(i) = block_prefix[i // BLOCK] + #{selected j : BLOCK * (i // BLOCK) <= j < i}``, where
``block_prefix`` is the exclusive prefix sum of per-block popcounts, derived once from the static
mask (8 bytes per BLOCK weights).
"""

from __future__ import annotations

import torch

from ._runtime import HAS_TRITON
from .bitpack import unpack_bits

STATE_BLOCK = 2048  # elements per block of the compact-index metadata (and of the optimizer kernels)


def block_prefix(packed: torch.Tensor, numel: int, block: int = STATE_BLOCK) -> torch.Tensor:
    """int64 exclusive prefix sum of selected counts per ``block`` elements (on ``packed``'s device)."""
    if block % 8:
        raise ValueError(f"block: must be a multiple of 8, got {block}")
    blocks = (numel + block - 1) // block
    if blocks == 0:
        return torch.zeros(1, dtype=torch.int64, device=packed.device)
    counts = torch.empty(blocks, dtype=torch.int64, device=packed.device)
    step = max(block, (1 << 24) // block * block)
    for start in range(0, numel, step):
        stop = min(numel, start + step)
        bits = unpack_bits(packed[start // 8 : (stop + 7) // 8], stop - start)
        pad = (-bits.numel()) % block
        if pad:
            bits = torch.cat([bits, bits.new_zeros(pad)])
        counts[start // block : (stop + block - 1) // block] = bits.view(-1, block).sum(1)
    return counts.cumsum(0) - counts


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def compact_index(prefix_ptr, pid, selected):
        """Compact-state index of each selected element of block ``pid`` (see the module docstring)."""
        flags = selected.to(tl.int32)
        before = tl.cumsum(flags, axis=0) - flags
        return tl.load(prefix_ptr + pid) + before.to(tl.int64)

    @triton.jit
    def block_selection(bits_ptr, n, block, MASKED: tl.constexpr, BLOCK: tl.constexpr):
        """Block ``block`` of an ``n``-element tensor: int64 offsets, in-range flags, and selected flags
        (every in-range element when not MASKED)."""
        offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n
        if MASKED:  # each mask byte is requested once (not by each of its 8 elements), then expanded
            byte_offs = block.to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
            packed = tl.load(bits_ptr + byte_offs, mask=byte_offs < (n + 7) // 8, other=0).to(tl.int32)
            flags = (packed[:, None] >> tl.arange(0, 8)[None, :]) & 1
            selected = valid & (tl.reshape(flags, (BLOCK,)) != 0)
        else:
            selected = valid
        return offs, valid, selected
