"""The commands under ``torchrun``: a process group from the environment and FSDP2 sharding.

``torchrun --nproc-per-node N`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``. With ``WORLD_SIZE > 1`` :func:`start_session` joins the process group (NCCL with one
GPU per local rank, gloo on CPUs) and :func:`shard_model` applies ``fully_shard`` to every decoder
layer (the model's ``_no_split_modules`` classes) and then to the whole model.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from wagle.errors import UserError


@dataclass(frozen=True)
class Session:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise UserError(f"WORLD_SIZE: expected an integer, got {value!r}") from None


def start_session(device: str | None = None) -> Session | None:
    """Join the process group torchrun describes (None when ``WORLD_SIZE`` is 1 or unset).

    ``device``: ``cpu`` forces gloo on CPUs; otherwise CUDA when available (``cuda:LOCAL_RANK``).
    """
    world = world_size_from_env()
    if world <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if cuda:
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(dist.destroy_process_group)
    return Session(dist.get_rank(), dist.get_world_size(), target)


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """``fully_shard`` each decoder layer (classes in ``model._no_split_modules``), then the model."""
    from torch.distributed.fsdp import fully_shard

    classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise UserError(
            f"--model: cannot find the decoder layers of {type(model).__name__} to shard with FSDP2 "
            "(no _no_split_modules)"
        )
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def refuse_torchrun(command: str) -> None:
    """A command that does not run sharded stops under torchrun instead of running N copies."""
    if world_size_from_env() > 1:
        raise UserError(
            f"{command} does not run under torchrun (WORLD_SIZE > 1); 'wagle mask' and 'wagle unlearn' "
            "do (FSDP2)"
        )
