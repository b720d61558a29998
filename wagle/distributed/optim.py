"""The masked optimizers on FSDP2 (DTensor) parameters: local masks, a global digest, DCP state.

``MaskedAdamW`` / ``MaskedSGD`` step every DTensor parameter on its local shard (``to_local()`` of
the parameter and of its gradient share storage with it) with the bits of that shard, so state is
local-shaped in both layouts (dense: the shard's shape; compact: the shard's selected weights).
:func:`localize_mask` turns the mask given (a :class:`~wagle.distributed.ShardedMask` from sharded
attribution, or a full :class:`~wagle.WeightMask`, e.g. a single-file mask) into the local one.
:func:`global_digest` makes the state_dict's mask digest the same on every rank: sha256 over the
ranks' local digests in rank order (one all-gather).

torch.distributed.checkpoint (DCP): :func:`optimizer_state_dict` gives a state dict whose entries are
rank-specific (``rank{r}.``...), so each rank saves and loads its own shard state with ``dcp.save`` /
``dcp.load``; :func:`load_optimizer_state_dict` restores it (the same world size and mask: the
digest is checked).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from wagle.errors import UserError
from wagle.mask import WeightMask

from .attribution import dtensor_layout, is_dtensor
from .masks import ShardedMask


def _pairs(params: list) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of a parameter list given as pairs or as groups of pairs."""
    out = []
    for item in params:
        if isinstance(item, Mapping):
            values = list(item.get("params", []))
            names = item.get("param_names")
            if names is not None:
                out += list(zip(names, values, strict=False))
            else:
                out += [v for v in values if isinstance(v, tuple | list) and len(v) == 2]
        elif isinstance(item, tuple | list) and len(item) == 2:
            out.append(tuple(item))
    return [(n, t) for n, t in out if isinstance(n, str) and isinstance(t, torch.Tensor)]


def localize_mask(params: list, mask) -> tuple[WeightMask, Any]:
    """``(mask over the local shards, process group)`` for parameters that include DTensors; the
    mask unchanged and None when none is a DTensor (and ``mask`` is not a ShardedMask)."""
    pairs = _pairs(params)
    deepspeed = [n for n, t in pairs if hasattr(t, "ds_id") or hasattr(t, "ds_tensor")]
    if deepspeed:
        from .attribution import UNSUPPORTED_DEEPSPEED

        raise TypeError(f"params: {deepspeed[0]!r} is a DeepSpeed ZeRO parameter. {UNSUPPORTED_DEEPSPEED}")
    sharded = [(n, t) for n, t in pairs if is_dtensor(t)]
    if not sharded:
        if isinstance(mask, ShardedMask):
            raise TypeError(
                "mask: a ShardedMask holds one rank's bits; the parameters are not DTensors "
                "(use mask.gather() for the full mask)"
            )
        return mask, None
    if not isinstance(mask, WeightMask | ShardedMask):
        raise TypeError(f"mask: expected a wagle.WeightMask or ShardedMask, got {type(mask).__name__}")
    meshes = [t.device_mesh for _, t in sharded]
    if any(m != meshes[0] for m in meshes[1:]):
        raise UserError("params: the DTensor parameters are sharded over different device meshes")
    shapes = mask.shapes
    entries = {}
    for name, tensor in pairs:
        if name not in shapes:
            continue  # the optimizer's `unmasked` policy decides
        if tuple(shapes[name]) != tuple(tensor.shape):
            continue  # the optimizer reports the shape mismatch
        if is_dtensor(tensor):
            offset, numel, local_shape = dtensor_layout(name, tensor)
        else:
            offset, numel, local_shape = 0, tensor.numel(), tuple(tensor.shape)
        if isinstance(mask, ShardedMask):
            part = mask.parts.get(name)
            if part is None or (part.offset, part.numel) != (offset, numel):
                held = None if part is None else (part.offset, part.numel)
                raise UserError(
                    f"mask: this rank's part of {name!r} is {held}, the parameter's shard is "
                    f"{(offset, numel)} (a mask made for another sharding? load it with load_sharded)"
                )
            packed = part.packed
        else:
            packed = ShardedMask.from_mask(mask, {name: (offset, numel)}).parts[name].packed
        entries[name] = (local_shape, packed)
    return WeightMask(entries, mask.metadata), meshes[0].get_group()


def local_view(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view sharing its storage), the tensor itself otherwise."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def global_digest(local: str, group) -> str:
    """sha256 over every rank's digest (hex) in rank order: equal on all ranks."""
    mine = torch.frombuffer(bytearray(bytes.fromhex(local)), dtype=torch.uint8)
    world = dist.get_world_size(group)
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    digest = hashlib.sha256()
    for part in out:
        digest.update(part.numpy().tobytes())
    return digest.hexdigest()


def _rank_key(optimizer) -> str:
    group = getattr(optimizer, "_shard_group", None)
    return f"rank{dist.get_rank(group) if group is not None else 0}"


def _initial_state(optimizer) -> None:
    """Zero state for every stepped parameter that has none yet (the template DCP loads into)."""
    for param, plan in optimizer.named_plans():
        if optimizer.skips(plan) or optimizer.state.get(param):
            continue
        group = optimizer.group_of(param)
        local = local_view(param)
        state = {}
        if "exp_avg" in optimizer.state_tensor_keys:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        for key in optimizer.state_tensor_keys:
            if key == "momentum_buffer" and not group.get("momentum"):
                continue
            state[key] = optimizer.new_state_tensor(local, plan)
        optimizer.state[param] = state


def optimizer_state_dict(optimizer) -> dict[str, Any]:
    """``{"rank{r}": optimizer.state_dict()}`` for ``dcp.save`` / ``dcp.load`` (state initialised
    to zeros for parameters that have none yet, so a fresh optimizer is a loading template)."""
    _initial_state(optimizer)
    return {_rank_key(optimizer): optimizer.state_dict()}


def load_optimizer_state_dict(optimizer, state_dict: Mapping[str, Any]) -> None:
    """Restore what :func:`optimizer_state_dict` saved (after ``dcp.load`` filled it in)."""
    key = _rank_key(optimizer)
    if key not in state_dict:
        raise UserError(f"state_dict: no entry {key!r} (saved at another world size?)")
    optimizer.load_state_dict(state_dict[key])
