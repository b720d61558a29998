"""``wagle.unlearn`` on an FSDP2 (``fully_shard``) model: micro-batches split over the ranks.

Optimizer step ``s`` has micro-batches ``j = s * A + m`` (``A = grad_accum``, ``m < A``), the same
seeded batches as on one device. In round ``k`` rank ``r`` runs micro-batch ``m = k * W + r`` and
backpropagates ``loss_j / A``; FSDP2 reduce-scatters a plain SUM (divide factor 1), so after the
step's ``ceil(A / W)`` rounds every shard holds ``sum_j grad(loss_j) / A`` (one device: the same terms
accumulated in micro-batch order; a rank without a micro-batch in the last round backpropagates
``0 * loss``). With ``A <= W`` (every term in one reduce-scatter) this equals the one-device gradient
bit for bit on a backend whose sum is exact for two terms; more terms are added in another order
(rounds first), which changes the last bits. The loss and the objective's statistics of every
micro-batch are gathered and averaged in micro-batch order, so the history equals one device's.

Clipping takes the global norm of the full gradients (:func:`wagle.distributed.clip_grad_norm_`),
the NaN/Inf checks agree over the ranks, and the objective's ``prepare`` (NPO's reference
log-probabilities, RMU's frozen activations) runs each rank on its share of the ordered batches, the
per-example results merged over the ranks. Checkpoints hold model and optimizer state written with
torch.distributed.checkpoint (``state/``) plus the small files rank 0 writes after a barrier, all
listed with their sha256 in ``manifest.json``; the folder must be on a file system every rank sees.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from wagle.errors import UserError
from wagle.files import remove_stale_temporaries, replace_folder, temporary_folder
from wagle.unlearning import checkpoint as one_device
from wagle.unlearning.checkpoint import MANIFEST, CheckpointError, file_sha256, list_checkpoints
from wagle.unlearning.loop import _Run

from .attribution import is_dtensor
from .optim import load_optimizer_state_dict, local_view, optimizer_state_dict

logger = logging.getLogger(__name__)

FORMAT = "wagle-checkpoint-dcp/1"
SMALL_FILES = ("objective.safetensors", "scheduler.pt", "trainer_state.json")


def _broadcast(value: Any, group=None) -> Any:
    """Rank 0's picklable ``value`` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _all_true(flag: bool, device: torch.device) -> bool:
    value = torch.tensor([0 if flag else 1], dtype=torch.int64, device=device)
    dist.all_reduce(value)
    return int(value[0]) == 0


class ShardedRun(_Run):
    """The optimizer step of :class:`wagle.unlearning.loop._Run` over the ranks of an FSDP2 model."""

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"

    def step(self, step: int) -> dict[str, float]:
        """``grad_accum`` micro-batches split over the ranks (round-robin), checks, clip, step."""
        rank, world = dist.get_rank(), dist.get_world_size()
        device = self._device()
        mine: list[tuple[int, float, dict[str, float]]] = []
        for first in range(0, self.grad_accum, world):
            micro = first + rank
            real = micro < self.grad_accum
            forget_batch, retain_batch = self.micro_batch(step * self.grad_accum + (micro if real else first))
            loss, stats = self.objective(self.model, forget_batch, retain_batch)
            finite = torch.tensor([float(bool(torch.isfinite(loss.detach())))], device=device)
            flags = [torch.empty_like(finite) for _ in range(world)]
            dist.all_gather(flags, finite)
            bad = [r for r, f in enumerate(flags) if float(f[0]) == 0.0 and first + r < self.grad_accum]
            if bad:
                raise self.diverged(
                    "the loss became NaN/Inf",
                    step,
                    f" (micro-batch {first + bad[0]}); stopped before applying it",
                )
            (loss / self.grad_accum * (1.0 if real else 0.0)).backward()
            if real:
                mine.append((micro, float(loss.detach()), dict(stats)))
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
        records = sorted((r for part in gathered for r in part), key=lambda r: r[0])
        totals: dict[str, float] = {}
        step_loss = 0.0
        for _, value, stats in records:  # averaged in micro-batch order, as on one device
            step_loss += value / self.grad_accum
            for key, stat in stats.items():
                totals[key] = totals.get(key, 0.0) + stat / self.grad_accum
        self.apply_gradients(step, totals)
        self.scheduler.step()
        return {"step": step + 1, "loss": step_loss, "lr": self.scheduler.get_last_lr()[0], **totals}

    def _grad_norm(self) -> float:
        """Clipping: as on one device (global norm of full gradients, bit for bit). Without clipping:
        the norm of the selected entries from all-reduced per-parameter sums of squares (float64), which
        can differ from one device's in the last bits (it only enters the history)."""
        from wagle.optim.clipping import clip_masked_grad_norm_

        if self.max_grad_norm > 0:
            return float(clip_masked_grad_norm_(self.optimizer, self.max_grad_norm, self.clip_mode))
        squares = []
        for param, plan in self.optimizer.named_plans():
            if param.grad is None:
                continue
            grad = local_view(param.grad.detach()).reshape(-1)
            if self.optimizer.skips(plan):
                grad = grad[:0]
            elif plan.masked and plan.selected != plan.numel:
                grad = torch.masked_select(grad, plan.selected_flat(grad.device))
            squares.append(grad.double().square().sum())
        if not squares:
            return 0.0
        total = torch.stack(squares).to(self._device())
        dist.all_reduce(total)
        return float(torch.linalg.vector_norm(total.sqrt().float(), 2.0))

    def check_weights(self, step: int) -> None:
        bad = [n for n, p in self.trainable if not bool(torch.isfinite(local_view(p.detach())).all())]
        names: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(names, bad[:1])
        first = next((part[0] for part in names if part), None)
        if first is not None:
            raise self.diverged(f"{first} became NaN/Inf", step, " with a finite loss and gradient")


def _share(batches: list | None, rank: int, world: int) -> list | None:
    """Rank ``rank``'s batches ``rank, rank + W, ...``, padded (repeating one) so that every rank runs
    the same number of forward passes."""
    if batches is None:
        return None
    mine = batches[rank::world]
    rounds = -(-len(batches) // world)
    filler = mine[-1] if mine else batches[0] if batches else None
    return mine + [filler] * (rounds - len(mine))


def merge_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The objective state of all ranks: 1-D float tables (NaN where a rank computed nothing) merged
    entry by entry, any other entry taken from the first rank that has it."""
    merged: dict[str, torch.Tensor] = {}
    for state in states:
        for key, value in state.items():
            if key not in merged:
                merged[key] = value.clone()
                continue
            held = merged[key]
            if value.dim() == 1 and value.is_floating_point() and held.dim() == 1:
                if value.numel() > held.numel():
                    held = torch.cat([held, torch.full((value.numel() - held.numel(),), float("nan"))])
                fill = torch.isnan(held[: value.numel()]) & ~torch.isnan(value)
                held[: value.numel()][fill] = value[fill]
                merged[key] = held
    return merged


def prepare_objective(objective, model, forget: list, retain: list | None, *, progress: bool) -> None:
    """``objective.prepare`` over the ranks: each on its share of the batches, the states merged."""
    rank, world = dist.get_rank(), dist.get_world_size()
    objective.prepare(model, _share(forget, rank, world), _share(retain, rank, world), progress=progress)
    states: list[Any] = [None] * world
    dist.all_gather_object(states, {k: v.detach().cpu() for k, v in objective.state_dict().items()})
    objective.load_state_dict(merge_states(states))


def weights_digest(model: torch.nn.Module) -> str:
    """:func:`wagle.unlearning.fingerprint.weights_digest` of the full (gathered) weights, one
    parameter at a time: equal to the one-device digest of the same weights, on every rank."""
    import hashlib

    from wagle.unlearning.fingerprint import _tensor_bytes

    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        full = param.detach().full_tensor() if is_dtensor(param) else param.detach()
        digest.update(f"{name}:{param.dtype}:{tuple(param.shape)}\n".encode())
        digest.update(_tensor_bytes(full))
        del full
    return f"sha256:{digest.hexdigest()}"


def _state(model, optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {"model": get_model_state_dict(model), "optim": optimizer_state_dict(optimizer)}


def _manifest(folder: str, step: int, world: int) -> dict[str, Any]:
    files = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            if rel != MANIFEST:
                files[rel] = {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}
    return {"format": FORMAT, "step": step, "world_size": world, "files": dict(sorted(files.items()))}


def verify_checkpoint(path: str) -> dict[str, Any]:
    """A sharded checkpoint checked against its manifest (a one-device one by
    :func:`wagle.unlearning.checkpoint.verify_checkpoint`); returns the trainer state."""
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return one_device.verify_checkpoint(path)
    files = manifest.get("files")
    needed = [*SMALL_FILES, "state/.metadata"]
    if not isinstance(files, dict) or any(name not in files for name in needed):
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is damaged (unexpected file list)")
    for name, info in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        if os.path.getsize(file) != info.get("bytes") or file_sha256(file) != info.get("sha256"):
            raise CheckpointError(f"checkpoint {path}: {name} is damaged (its size or sha256 differs)")
    return one_device.read_trainer_state(path)


class ShardedCheckpoints:
    """The checkpoint functions of :mod:`wagle.unlearning.checkpoint` for an FSDP2 run (same
    signatures, called on every rank): DCP for model and optimizer, rank 0 for the small files."""

    def __init__(self):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def remove_stale_temporaries(self, directory: str) -> None:
        if self.rank == 0:
            remove_stale_temporaries(directory)
        dist.barrier()

    def remove_checkpoints(self, directory: str) -> None:
        if self.rank == 0:
            one_device.remove_checkpoints(directory)
        dist.barrier()

    def find_checkpoint(self, directory: str):
        """Rank 0 finds the newest good checkpoint; every rank gets ``(path, state, problems)``."""
        found, error = None, None
        if self.rank == 0:
            problems: list[str] = []
            try:
                for path in list_checkpoints(directory):
                    try:
                        found = (path, verify_checkpoint(path), problems)
                        break
                    except CheckpointError as exc:
                        logger.warning("%s; trying the previous checkpoint", exc)
                        problems.append(str(exc))
                if found is None and problems:
                    raise CheckpointError(f"{problems[0]}; no earlier good checkpoint in {directory}")
            except CheckpointError as exc:
                error = str(exc)
            found = found or (None, None, problems)
        found, error = _broadcast((found, error))
        if error is not None:
            raise CheckpointError(error)
        return found

    def load_checkpoint(self, path, model, optimizer, scheduler, *, verified: bool = False):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        state = verify_checkpoint(path) if not verified else None
        if not os.path.isdir(os.path.join(path, "state")):
            raise CheckpointError(f"checkpoint {path}: not a sharded checkpoint (no state/)")
        template = _state(model, optimizer)
        dcp.load(template, checkpoint_id=os.path.join(path, "state"))
        set_model_state_dict(model, template["model"])
        load_optimizer_state_dict(optimizer, template["optim"])
        saved = torch.load(os.path.join(path, "scheduler.pt"), map_location="cpu", weights_only=False)
        if scheduler is not None and saved is not None:
            scheduler.load_state_dict(saved)
        if state is None:
            with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as handle:
                state = json.load(handle)
        return load_file(os.path.join(path, "objective.safetensors")), state

    def save_checkpoint(
        self, directory, step, model, optimizer, scheduler, objective_state, trainer_state, keep: int = 2
    ) -> str:
        """Checkpoint ``step``: every rank writes its DCP shard into a temporary folder, then (after a
        barrier) rank 0 writes the small files and the manifest, renames the folder into place and
        prunes older checkpoints; returns the path on every rank."""
        import torch.distributed.checkpoint as dcp

        tmp = None
        if self.rank == 0:
            os.makedirs(directory, exist_ok=True)
            tmp = temporary_folder(directory, ".tmp-checkpoint-")
        tmp = _broadcast(tmp)
        final = os.path.join(directory, f"checkpoint-{step:06d}")
        error = None
        try:
            dcp.save(_state(model, optimizer), checkpoint_id=os.path.join(tmp, "state"))
        except Exception as exc:  # every rank must reach the barrier below
            error = f"checkpoint {step}: {exc}"
        errors: list[Any] = [None] * self.world
        dist.all_gather_object(errors, error)
        if any(errors):
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(next(e for e in errors if e))
        if self.rank == 0:
            try:
                torch.save(scheduler.state_dict() if scheduler else None, os.path.join(tmp, "scheduler.pt"))
                one_device.write_run_state(tmp, objective_state, trainer_state, step)
                with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as handle:
                    json.dump(_manifest(tmp, step, self.world), handle, indent=1)
                replace_folder(tmp, final)
                one_device.publish_checkpoint(directory, final, keep)
                error = None
            except Exception as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                error = f"{type(exc).__name__}: {exc}"
        error = _broadcast(error)
        if error is not None:
            raise OSError(f"checkpoint {step}: {error}")
        return final


def check_options(*, step_in_backward: bool, precision, optimizer) -> None:
    """What the FSDP2 path does not do, as clear errors."""
    if step_in_backward:
        raise UserError("step_in_backward: not supported on FSDP2 models (the step runs after the backward)")
    if precision is not None:
        raise UserError("precision: cast an FSDP2 model before fully_shard (pass precision=None)")
    if optimizer is not None:
        raise UserError("optimizer: an FSDP2 run uses wagle's MaskedAdamW (its state is saved with DCP)")


def save_full_model(model: torch.nn.Module, tokenizer, path: str) -> None:
    """Gather the full weights of an FSDP2 Hugging Face model (to the CPU) and save them on rank 0 as
    a one-device model folder (:func:`wagle.models.save_model`); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    error = None
    if dist.get_rank() == 0:
        try:
            from wagle.models import save_model

            cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
            plain = cls(model.config)
            dtypes = {t.dtype for t in state.values()}
            if len(dtypes) == 1:
                plain.to(next(iter(dtypes)))
            plain.load_state_dict(state, strict=False)
            missing = sorted(set(dict(plain.named_parameters())) - set(state))
            if missing:
                raise UserError(f"model: the gathered state has no weights for {missing[:5]}")
            save_model(plain, tokenizer, path)
        except Exception as exc:
            error = exc
    message = _broadcast(None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise OSError(f"saving the model to {path} failed on rank 0: {message}")
