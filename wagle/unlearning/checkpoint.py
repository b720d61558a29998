"""Atomic, resumable unlearning checkpoints: model weights, optimizer, scheduler, objective state, step.

A checkpoint is a folder ``checkpoint-{step:06d}`` written under a temporary name and renamed into
place, then named in ``latest`` (also replaced atomically), so an interrupted run never leaves a
half-written checkpoint behind and never loses one already saved.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from wagle.errors import UserError
from wagle.files import atomic_write_text, replace_folder, temporary_folder

LATEST = "latest"


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters() lists a tied weight once; buffers (e.g. rotary caches) are rebuilt by the model
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()}


def save_checkpoint(
    directory: str,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    objective_state: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    keep: int = 2,
) -> str:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep`` checkpoints."""
    os.makedirs(directory, exist_ok=True)
    final = os.path.join(directory, f"checkpoint-{step:06d}")
    tmp = temporary_folder(directory, ".tmp-checkpoint-")
    try:
        save_file(_model_tensors(model), os.path.join(tmp, "model.safetensors"))
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None},
            os.path.join(tmp, "optimizer.pt"),
        )
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in objective_state.items()},
            os.path.join(tmp, "objective.safetensors"),
        )
        with open(os.path.join(tmp, "trainer_state.json"), "w") as handle:
            json.dump({**trainer_state, "step": step}, handle, indent=1)
        replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(os.path.join(directory, LATEST), os.path.basename(final))
    checkpoints = sorted(d for d in os.listdir(directory) if d.startswith("checkpoint-"))
    for old in checkpoints[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(directory, old), ignore_errors=True)
    return final


def latest_checkpoint(directory: str | None) -> str | None:
    """Path of the newest complete checkpoint in ``directory`` (None when there is none)."""
    if not directory or not os.path.isdir(directory):
        return None
    pointer = os.path.join(directory, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as handle:
            path = os.path.join(directory, handle.read().strip())
        if os.path.isfile(os.path.join(path, "trainer_state.json")):
            return path
    return None


def load_checkpoint(path: str, model: torch.nn.Module, optimizer, scheduler) -> tuple[dict, dict]:
    """Restore model weights, optimizer and scheduler in place; returns (objective state, trainer state)."""
    tensors = load_file(os.path.join(path, "model.safetensors"))
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise UserError(f"checkpoint {path}: no weights for {missing[:5]}: was it made for another model?")
    with torch.no_grad():
        for name, param in params.items():
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise UserError(f"checkpoint {path}: {name} has shape {tuple(tensors[name].shape)}")
            param.copy_(tensors[name])
    state = torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    objective_state = load_file(os.path.join(path, "objective.safetensors"))
    with open(os.path.join(path, "trainer_state.json")) as handle:
        trainer_state = json.load(handle)
    return objective_state, trainer_state
