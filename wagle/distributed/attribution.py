"""``wagle.attribute`` on sharded and replicated models: FSDP2 (``fully_shard``) and DDP.

Gradients are SUMMED over the batches (as on one device) and over the ranks: every rank iterates the
same batches and computes the gradients of its share (batch ``i`` goes to rank ``i % W``; a rank
without a batch in the last round runs a zero-weighted backward of that round's first batch, so all
ranks run the same number of backward passes).

* FSDP2: each rank's gradients are reduce-scattered by FSDP itself with a plain SUM
  (``set_gradient_divide_factor(1.0)`` and ``set_force_sum_reduction_for_comms(True)`` on every FSDP
  module for the duration, then restored). Each rank scores its own ``Shard(0)`` rows and the selection
  runs over the shards (:func:`~wagle.distributed.select_segments`); the result is a
  :class:`~wagle.distributed.ShardedMask` holding this rank's bits (``.gather()`` for the full mask).
* DDP (``DistributedDataParallel``): the wrapped module's gradients stay local (no DDP all-reduce),
  then are reduce-scattered per parameter (SUM; rank ``r`` receives flat range ``r`` of
  ``torch.chunk``-sized pieces), each rank selects on its range, and the bits are all-gathered: every
  rank returns the same full :class:`~wagle.WeightMask`, with the wrapped module's parameter names.

The selection is exact: the mask equals :func:`wagle.mask_from_gradients` on the summed gradients bit
for bit. The gradients equal one device's when the cross-rank sum adds the same values in the same
order, e.g. one batch per rank (at most two non-zero contributions per element, as with two batches
at any world size); beyond that floating-point addition order may change the last bit of a gradient.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.distributed as dist

from wagle.attribution.from_model import gradient_scope
from wagle.errors import UserError
from wagle.mask import WeightMask

from .comm import Collectives
from .masks import ShardedMask
from .selection import Segment, select_segments

logger = logging.getLogger(__name__)


def is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(tensor, DTensor)


def is_deepspeed(model: torch.nn.Module, params: Mapping[str, torch.Tensor]) -> bool:
    """A DeepSpeed engine, or parameters partitioned by DeepSpeed ZeRO (``ds_id`` attributes)."""
    if type(model).__name__ in ("DeepSpeedEngine", "PipelineEngine"):
        return True
    return any(hasattr(p, "ds_id") or hasattr(p, "ds_tensor") for p in params.values())


def is_ddp(model: torch.nn.Module) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


UNSUPPORTED_DEEPSPEED = (
    "DeepSpeed models are not supported: wagle's sharded attribution and masked optimizers support "
    "FSDP2 (torch.distributed.fsdp.fully_shard) and DistributedDataParallel models, or one device; "
    "load the model without DeepSpeed (e.g. wrap it with fully_shard) to compute a mask"
)


def check_supported(model: torch.nn.Module, params: Mapping[str, torch.Tensor]) -> None:
    """Raise a clear error for parallel wrappers this library cannot handle."""
    if is_deepspeed(model, params):
        raise TypeError(UNSUPPORTED_DEEPSPEED)
    dtensors = [name for name, p in params.items() if is_dtensor(p)]
    if dtensors and len(dtensors) != len(params):
        plain = [name for name, p in params.items() if not is_dtensor(p)]
        raise UserError(
            f"model: parameters {dtensors[:2]} are DTensors but {plain[:2]} are not; shard every "
            "selected parameter with fully_shard (or restrict include/exclude)"
        )


def dtensor_layout(name: str, param) -> tuple[int, int, tuple[int, ...]]:
    """``(flat offset, numel, local shape)`` of this rank's ``Shard(0)`` part of a DTensor."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        raise UserError(
            f"parameter {name!r}: placements {tuple(param.placements)} on a {param.device_mesh.ndim}-D mesh; "
            "sharded attribution supports FSDP2's Shard(0) on a 1-D mesh"
        )
    local = param.to_local()
    _, global_offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    row = math.prod(param.shape[1:]) if param.dim() > 1 else 1
    offset = int(global_offset[0]) * row if local.numel() else 0
    return offset, local.numel(), tuple(local.shape)


def fsdp_group(params: Mapping[str, torch.Tensor]):
    meshes = [p.device_mesh for p in params.values()]
    if any(mesh != meshes[0] for mesh in meshes[1:]):
        raise UserError("model: the selected parameters are sharded over different device meshes")
    return meshes[0].get_group()


def fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def summed_fsdp_gradients(model: torch.nn.Module) -> Iterator[None]:
    """FSDP2 reduces gradients with a plain SUM inside the block (divide factor 1, SUM-only comms);
    each FSDP module's previous settings are restored after it."""
    modules = fsdp_modules(model)
    saved = []
    for module in modules:
        groups = module._get_fsdp_state()._fsdp_param_groups
        saved.append([(g.gradient_divide_factor, g.force_sum_reduction_for_comms) for g in groups])
    try:
        for module in modules:
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
        yield
    finally:
        for module, settings in zip(modules, saved, strict=True):
            for g, (factor, force) in zip(module._get_fsdp_state()._fsdp_param_groups, settings, strict=True):
                g.gradient_divide_factor = factor
                g.force_sum_reduction_for_comms = force


def accumulate_shared(
    model: torch.nn.Module,
    batches: Iterable,
    device: torch.device,
    comm: Collectives,
    *,
    max_batches: int | None,
    desc: str,
) -> int:
    """Backward of this rank's share of ``batches`` (batch i on rank i % W; a short last round pads
    with zero-weighted backwards). Returns the number of batches over all ranks."""
    from wagle.attribution.from_model import _batch_loss, _to_device

    rank, world = comm.rank, comm.world_size
    count, bad = 0, 0.0
    iterator = iter(batches)
    done = False
    while not done:
        round_batches = []
        while len(round_batches) < world:
            if max_batches is not None and count >= max_batches:
                done = True
                break
            try:
                round_batches.append(next(iterator))
            except StopIteration:
                done = True
                break
            count += 1
        if not round_batches:
            break
        mine = rank < len(round_batches)
        loss = _batch_loss(model, _to_device(round_batches[rank if mine else 0], device))
        if mine and not torch.isfinite(loss):
            bad = float(loss)
        (loss if mine else loss * 0.0).backward()
    flags = comm.all_reduce_sum(torch.tensor([count, 0 if bad == 0.0 else 1], dtype=torch.int64))
    if int(flags[1]):
        raise FloatingPointError(f"{desc}: a loss is not finite on {int(flags[1])} rank(s)")
    if int(flags[0]) != count * world:
        raise RuntimeError(f"{desc}: the ranks iterated different numbers of batches (pass the same data)")
    if count == 0:
        raise UserError(f"{desc}: no batches (the data set is empty)")
    return count


def _take_local_grads(params: Mapping[str, torch.Tensor], to_host: bool) -> dict[str, torch.Tensor]:
    grads = {}
    for name, p in params.items():
        grad = p.grad
        local = grad.to_local() if grad is not None and is_dtensor(grad) else grad
        if local is None:
            local = torch.zeros_like(p.to_local() if is_dtensor(p) else p)
        local = local.detach().reshape(-1)
        if to_host and local.device.type != "cpu":
            local = local.to("cpu")
        grads[name] = local
        p.grad = None
    return grads


def _gradients(
    model, forget, retain, params, device, comm, *, needs_retain, max_batches, offload, checkpointing
):
    from wagle.models.checkpointing import activation_checkpointing

    with activation_checkpointing(model, checkpointing, keep_eval=True):
        accumulate_shared(model, forget, device, comm, max_batches=max_batches, desc="forget gradients")
        grad_forget = _take_local_grads(params, offload)
        grad_retain = None
        if needs_retain:
            accumulate_shared(model, retain, device, comm, max_batches=max_batches, desc="retain gradients")
            grad_retain = _take_local_grads(params, False)
    return grad_forget, grad_retain


def attribute_fsdp(
    model: torch.nn.Module,
    forget,
    retain,
    params: Mapping[str, torch.Tensor],
    *,
    needs_forget: bool,
    needs_retain: bool,
    max_batches: int | None,
    offload_gradients: bool,
    gradient_checkpointing: bool,
    **select_kw,
) -> ShardedMask:
    """Attribution of an FSDP2 model: this rank's bits of the one-device mask (see the module doc)."""
    comm = Collectives(fsdp_group(params))
    layout = {name: dtensor_layout(name, p) for name, p in params.items()}
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    local_params = {name: p.to_local() for name, p in params.items()}
    device = next(iter(local_params.values())).device
    grad_forget = grad_retain = None
    if needs_forget:
        with gradient_scope(model, params), summed_fsdp_gradients(model):
            grad_forget, grad_retain = _gradients(
                model,
                forget,
                retain,
                params,
                device,
                comm,
                needs_retain=needs_retain,
                max_batches=max_batches,
                offload=offload_gradients,
                checkpointing=gradient_checkpointing,
            )
    segments = []
    for name, (offset, numel, local_shape) in layout.items():
        segments.append(
            Segment(
                name,
                offset,
                numel,
                local_params[name].detach().reshape(-1),
                None if grad_forget is None else _on(grad_forget[name], device),
                None if grad_retain is None else grad_retain[name],
                local_shape=local_shape,
            )
        )
    logger.info("scoring %d sharded tensors (rank %d of %d)", len(segments), comm.rank, comm.world_size)
    return select_segments(shapes, segments, comm=comm, **select_kw)


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor if tensor.device == device else tensor.to(device)


def reduce_scatter_ranges(
    grads: Mapping[str, torch.Tensor], comm: Collectives
) -> dict[str, tuple[int, int, torch.Tensor]]:
    """Per parameter, SUM-reduce-scatter the flat gradient: rank r gets elements
    ``[r*c, min(n, (r+1)*c))`` with ``c = ceil(n / W)``. Returns ``name -> (offset, numel, values)``."""
    world, rank = comm.world_size, comm.rank
    out = {}
    for name, grad in grads.items():
        flat = grad.reshape(-1)
        n = flat.numel()
        chunk = -(-n // world) if n else 0
        padded = torch.zeros(chunk * world, dtype=flat.dtype, device=comm.device)
        padded[:n] = flat.to(comm.device)
        piece = torch.empty(chunk, dtype=flat.dtype, device=comm.device)
        if chunk:
            dist.reduce_scatter_tensor(piece, padded, op=dist.ReduceOp.SUM, group=comm.group)
        lo, hi = min(rank * chunk, n), min((rank + 1) * chunk, n)
        out[name] = (lo, hi - lo, piece[: hi - lo].to(grad.device))
    return out


def attribute_ddp(
    model: torch.nn.Module,
    forget,
    retain,
    params: Mapping[str, torch.Tensor],
    *,
    needs_forget: bool,
    needs_retain: bool,
    max_batches: int | None,
    offload_gradients: bool,
    gradient_checkpointing: bool,
    **select_kw,
) -> WeightMask:
    """Attribution of a DDP model: the full one-device mask on every rank (see the module doc)."""
    comm = Collectives(model.process_group)
    inner = model.module
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    device = next(iter(params.values())).device
    ranges = {}
    if needs_forget:
        with gradient_scope(inner, params):
            grad_forget, grad_retain = _gradients(
                inner,
                forget,
                retain,
                params,
                device,
                comm,
                needs_retain=needs_retain,
                max_batches=max_batches,
                offload=False,
                checkpointing=gradient_checkpointing,
            )
        forget_parts = reduce_scatter_ranges(grad_forget, comm)
        del grad_forget
        retain_parts = reduce_scatter_ranges(grad_retain, comm) if grad_retain is not None else None
        for name, (lo, num, values) in forget_parts.items():
            ranges[name] = (lo, num, values, None if retain_parts is None else retain_parts[name][2])
    else:
        world, rank = comm.world_size, comm.rank
        for name, p in params.items():
            n = p.numel()
            chunk = -(-n // world) if n else 0
            lo, hi = min(rank * chunk, n), min((rank + 1) * chunk, n)
            ranges[name] = (lo, hi - lo, None, None)
    segments = []
    for name, (lo, num, gf, gr) in ranges.items():
        weight = params[name].detach().reshape(-1)[lo : lo + num]
        segments.append(Segment(name, lo, num, weight, gf, gr))
    return select_segments(shapes, segments, comm=comm, **select_kw).gather(comm)


def attribute_distributed(
    model: torch.nn.Module,
    forget,
    retain,
    *,
    include,
    exclude,
    method: str,
    max_batches: int | None,
    offload_gradients: bool,
    gradient_checkpointing: bool,
    **select_kw,
) -> ShardedMask | WeightMask:
    """Dispatch of :func:`wagle.attribute` for FSDP2 and DDP models (called by it)."""
    from wagle.attribution.from_model import select_parameters

    if method == "wanda":
        raise UserError("method='wanda' is not supported on FSDP2/DDP models (it needs full activations)")
    from wagle_kernels.scores import get_method

    needs_forget, needs_retain = get_method(method).reads[1:]
    if needs_forget and forget is None:
        raise UserError(f"forget: method={method!r} needs forget-set batches")
    if needs_retain and retain is None:
        raise UserError(f"retain: method={method!r} needs retain-set batches")
    kw = {
        "needs_forget": needs_forget,
        "needs_retain": needs_retain,
        "max_batches": max_batches,
        "offload_gradients": offload_gradients,
        "gradient_checkpointing": gradient_checkpointing,
        "method": method,
        **select_kw,
    }
    was_training = model.training
    model.eval()
    try:
        if is_ddp(model):
            params = select_parameters(model.module, include, exclude)
            return attribute_ddp(model, forget, retain, params, **kw)
        params = select_parameters(model, include, exclude)
        check_supported(model, params)
        return attribute_fsdp(model, forget, retain, params, **kw)
    finally:
        model.train(was_training)


def distributed_kind(model: torch.nn.Module) -> str | None:
    """``"fsdp"``, ``"ddp"`` or None (one device); raises for DeepSpeed models."""
    params = dict(model.named_parameters())
    if is_deepspeed(model, params):
        raise TypeError(UNSUPPORTED_DEEPSPEED)
    if is_ddp(model):
        return "ddp"
    if any(is_dtensor(p) for p in params.values()):
        return "fsdp"
    return None


def refuse_sharded(model: torch.nn.Module, what: str) -> None:
    """Raise a clear error when ``what`` (an entry point without sharded support) gets an FSDP2, DDP
    or DeepSpeed model."""
    kind = distributed_kind(model)
    if kind is not None:
        raise TypeError(
            f"{what} does not support {'FSDP2' if kind == 'fsdp' else 'DDP'} models; on FSDP2 use "
            "wagle.attribute and wagle.MaskedAdamW/MaskedSGD with wagle.distributed.clip_grad_norm_ "
            "in your own training loop"
        )
