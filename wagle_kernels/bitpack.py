"""Bit-packed boolean masks: 1 bit per weight, little-endian bit order within each byte.

Element ``i`` of a flattened mask lives in byte ``i // 8`` at bit ``i % 8`` (``numpy.packbits`` with
``bitorder="little"``). Bits past the last element of the last byte are zero. The layout is written
here only: :func:`pack_bits` (torch) and :func:`pack_block` (inside the Triton mask kernels).
"""

from __future__ import annotations

import torch

from ._runtime import HAS_TRITON

_BIT_WEIGHTS_CACHE: dict[torch.device, torch.Tensor] = {}


def _bit_weights(device: torch.device) -> torch.Tensor:
    weights = _BIT_WEIGHTS_CACHE.get(device)
    if weights is None:
        weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=device)
        _BIT_WEIGHTS_CACHE[device] = weights
    return weights


def packed_size(numel: int) -> int:
    """Number of bytes that hold ``numel`` bits."""
    return (numel + 7) // 8


def pack_bits(mask: torch.Tensor, chunk: int = 1 << 24) -> torch.Tensor:
    """Pack a boolean tensor (any shape, flattened in C order) into a uint8 tensor of ``ceil(n/8)`` bytes."""
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected a bool tensor, got {mask.dtype}")
    flat = mask.reshape(-1)
    n = flat.numel()
    out = torch.empty(packed_size(n), dtype=torch.uint8, device=flat.device)
    weights = _bit_weights(flat.device)
    full_bytes = n // 8
    step = max(8, chunk - chunk % 8)
    for start in range(0, full_bytes * 8, step):
        stop = min(start + step, full_bytes * 8)
        block = flat[start:stop].view(-1, 8).to(torch.uint8)
        out[start // 8 : stop // 8] = (block * weights).sum(dim=1, dtype=torch.uint8)
    if n % 8:
        tail = torch.zeros(8, dtype=torch.uint8, device=flat.device)
        tail[: n % 8] = flat[full_bytes * 8 :].to(torch.uint8)
        out[full_bytes] = (tail * weights).sum(dtype=torch.uint8)
    return out


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a flat bool tensor of ``numel`` elements."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed: expected a uint8 tensor, got {packed.dtype}")
    if packed.numel() != packed_size(numel):
        raise ValueError(f"packed: {packed.numel()} bytes cannot hold exactly {numel} bits")
    bits = packed.reshape(-1, 1).bitwise_and(_bit_weights(packed.device)).ne(0)
    return bits.reshape(-1)[:numel]


_POPCOUNT_TABLE = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)


def popcount(packed: torch.Tensor, chunk: int = 1 << 24) -> int:
    """Number of set bits in a packed mask (the tail bits of the last byte are zero by construction)."""
    table = _POPCOUNT_TABLE.to(packed.device)
    flat = packed.reshape(-1)
    total = 0
    for start in range(0, flat.numel(), chunk):
        total += int(table[flat[start : start + chunk].long()].sum(dtype=torch.int64))
    return total


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def pack_block(selected, BLOCK: tl.constexpr):
        """The ``BLOCK // 8`` bytes of a block of ``BLOCK`` flags: ``byte_j = sum_b flag[8j + b] << b``."""
        bits = tl.reshape(selected.to(tl.int32), (BLOCK // 8, 8))
        weights = 1 << tl.arange(0, 8)
        return tl.sum(bits * weights[None, :], axis=1).to(tl.uint8)
