"""Multi-tensor launches without pointer tables: one base pointer plus element offsets.

A kernel that updates many tensors in one launch normally loads each tensor's pointer from a table,
which Triton's interpreter cannot do. Instead, the tensors of one dtype are addressed from a single
base pointer (the lowest address among them) plus an int64 element offset per tensor - plain pointer
arithmetic, valid in the flat device address space and in the interpreter alike. A per-block table
maps each program to (tensor, block within tensor).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def address_table(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]] | None:
    """``(base tensor, element offsets)`` for same-dtype, same-device tensors; None if an address is
    not a whole number of elements away from the base (then launch per tensor)."""
    if not tensors:
        return None
    dtype, device = tensors[0].dtype, tensors[0].device
    if any(t.dtype != dtype or t.device != device for t in tensors):
        return None
    base = min(tensors, key=lambda t: t.data_ptr())
    size = base.element_size()
    offsets = []
    for t in tensors:
        delta = t.data_ptr() - base.data_ptr()
        if delta % size:
            return None
        offsets.append(delta // size)
    return base, offsets


def block_tables(
    numels: Sequence[int], block: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 (tensor index, block index within the tensor) for every program of a multi-tensor launch."""
    owners, indices = [], []
    for t, n in enumerate(numels):
        blocks = (n + block - 1) // block
        owners.extend([t] * blocks)
        indices.extend(range(blocks))
    return (
        torch.tensor(owners, dtype=torch.int32, device=device),
        torch.tensor(indices, dtype=torch.int32, device=device),
    )
