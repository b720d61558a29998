"""The few collectives sharded selection needs, over a ``torch.distributed`` process group.

:class:`Collectives` wraps ``dist.all_reduce`` (SUM), ``dist.all_gather`` and ``dist.broadcast`` on
small int64 tensors and counts the bytes each rank contributes, so a selection reports what it sent.
Tensors travel on the device the backend needs (CUDA for NCCL, the CPU for gloo) and come back on
the CPU. Any object with the same four methods (``rank``, ``world_size``, ``all_reduce_sum``,
``all_gather``, ``broadcast``) can stand in for it, e.g. a simulation of several ranks in one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class CommStats:
    """Bytes this rank contributed to each kind of collective, and how many collectives it joined."""

    all_reduce_bytes: int = 0
    all_gather_bytes: int = 0
    broadcast_bytes: int = 0
    calls: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.all_reduce_bytes + self.all_gather_bytes + self.broadcast_bytes

    def count(self, kind: str, tensor: torch.Tensor) -> None:
        setattr(
            self, f"{kind}_bytes", getattr(self, f"{kind}_bytes") + tensor.numel() * tensor.element_size()
        )
        self.calls[kind] = self.calls.get(kind, 0) + 1


class Collectives:
    """SUM all-reduce, all-gather and broadcast over ``group`` (default: the world group)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialized: call torch.distributed.init_process_group first "
                "(torchrun sets up the environment for it)"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        backend = str(dist.get_backend(group)).lower()
        if "nccl" in backend:
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.stats = CommStats()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over the ranks (a new CPU tensor)."""
        work = tensor.to(self.device, copy=True)
        self.stats.count("all_reduce", work)
        dist.all_reduce(work, op=dist.ReduceOp.SUM, group=self.group)
        return work.cpu()

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape and dtype on every rank), in rank order (CPU tensors)."""
        work = tensor.to(self.device).contiguous()
        self.stats.count("all_gather", work)
        out = [torch.empty_like(work) for _ in range(self.world_size)]
        dist.all_gather(out, work, group=self.group)
        return [t.cpu() for t in out]

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``tensor`` of rank ``src`` (group rank) on every rank (a new CPU tensor)."""
        work = tensor.to(self.device, copy=True)
        self.stats.count("broadcast", work)
        dist.broadcast(
            work, src=dist.get_global_rank(self.group, src) if self.group else src, group=self.group
        )
        return work.cpu()


def collectives(comm=None):
    """``comm`` itself when it already has the collective methods, else :class:`Collectives` over it
    (a process group or None for the world group)."""
    if comm is not None and hasattr(comm, "all_reduce_sum"):
        return comm
    return Collectives(comm)
