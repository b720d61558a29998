"""Atomic, verified, resumable unlearning checkpoints: weights, optimizer, scheduler, objective state, step.

A checkpoint is a folder ``checkpoint-{step:06d}`` holding ``model.safetensors``, ``optimizer.pt``,
``objective.safetensors``, ``trainer_state.json`` and, written last, ``manifest.json`` with the size
and sha256 of each of them (read back from disk after writing). The folder is filled under a
temporary name, every file is flushed to disk, and only then is it renamed into place; the pointer
``latest`` is replaced atomically after it. A folder whose manifest is missing, unreadable or does not
match its files is not a checkpoint: :func:`find_checkpoint` skips it (naming the damaged file) and
falls back to the previous one. Older checkpoints are pruned only after a new one is in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from wagle.errors import UserError
from wagle.files import atomic_write_text, remove_stale_temporaries, replace_folder, temporary_folder
from wagle.validation import check_number

logger = logging.getLogger(__name__)

LATEST = "latest"
MANIFEST = "manifest.json"
FORMAT = "wagle-checkpoint/1"
FILES = ("model.safetensors", "optimizer.pt", "objective.safetensors", "trainer_state.json")
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(UserError):
    """A checkpoint is damaged or incomplete; the message names the checkpoint and the file."""


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters() lists a tied weight once; buffers (e.g. rotary caches) are rebuilt by the model
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()}


def file_sha256(path: str, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file's bytes, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_step(path: str) -> int | None:
    """The step in a ``checkpoint-NNNNNN`` folder name (None for other names)."""
    match = _NAME.match(os.path.basename(os.path.normpath(path)))
    return int(match[1]) if match else None


def list_checkpoints(directory: str | None) -> list[str]:
    """Paths of the ``checkpoint-*`` folders in ``directory``, newest (highest step) first."""
    if not directory or not os.path.isdir(directory):
        return []
    found = [(checkpoint_step(name), name) for name in os.listdir(directory)]
    return [
        os.path.join(directory, name)
        for step, name in sorted((s, n) for s, n in found if s is not None)[::-1]
        if os.path.isdir(os.path.join(directory, name))
    ]


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
    """Write checkpoint ``step`` atomically and keep only the newest ``keep`` (>= 1) checkpoints.

    Refuses (ValueError) to write weights that are not finite."""
    check_number("keep", keep, low=1, integer=True)
    os.makedirs(directory, exist_ok=True)
    tensors = _model_tensors(model)
    bad = next((name for name, t in tensors.items() if not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise ValueError(f"model: {bad} has NaN/Inf weights; not writing checkpoint {step}")
    final = os.path.join(directory, f"checkpoint-{step:06d}")
    tmp = temporary_folder(directory, ".tmp-checkpoint-")
    try:
        save_file(tensors, os.path.join(tmp, "model.safetensors"))
        del tensors
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None},
            os.path.join(tmp, "optimizer.pt"),
        )
        write_run_state(tmp, objective_state, trainer_state, step)
        files = {}
        for name in FILES:
            file = os.path.join(tmp, name)
            files[name] = {"bytes": os.path.getsize(file), "sha256": file_sha256(file)}
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as handle:
            json.dump({"format": FORMAT, "step": step, "files": files}, handle, indent=1)
        replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_checkpoint(directory, final, keep)
    return final


def write_run_state(folder: str, objective_state, trainer_state: dict[str, Any], step: int) -> None:
    """Write ``objective.safetensors`` (the objective's tensors, on CPU) and ``trainer_state.json``
    (``trainer_state`` with ``step``) into a checkpoint folder being built."""
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in objective_state.items()},
        os.path.join(folder, "objective.safetensors"),
    )
    with open(os.path.join(folder, "trainer_state.json"), "w", encoding="utf-8") as handle:
        json.dump({**trainer_state, "step": step}, handle, indent=1)


def publish_checkpoint(directory: str, final: str, keep: int) -> None:
    """Point ``LATEST`` at the finished checkpoint ``final`` and delete all but the newest ``keep``."""
    atomic_write_text(os.path.join(directory, LATEST), os.path.basename(final))
    for old in list_checkpoints(directory)[keep:]:
        if os.path.abspath(old) != os.path.abspath(final):
            shutil.rmtree(old, ignore_errors=True)


def verify_checkpoint(path: str) -> dict[str, Any]:
    """Check ``path`` against its manifest (every file present, same size and sha256); returns the
    trainer state. Raises :class:`CheckpointError` naming the first file that is missing or damaged."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"checkpoint {path}: no {MANIFEST} (incomplete, or not written by this wagle)")
    try:
        with open(manifest_path, encoding="utf-8") as handle:
            manifest = json.load(handle)
        files = manifest["files"]
        if manifest.get("format") != FORMAT or set(files) != set(FILES):
            raise ValueError("unexpected format or file list")
        expected = {name: (int(files[name]["bytes"]), str(files[name]["sha256"])) for name in FILES}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is damaged ({exc})") from None
    for name in FILES:
        file = os.path.join(path, name)
        size, sha = expected[name]
        if not os.path.isfile(file):
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        where = f"checkpoint {path}: {name} is damaged"
        if os.path.getsize(file) != size:
            raise CheckpointError(f"{where} ({os.path.getsize(file)} bytes, {MANIFEST} says {size})")
        if file_sha256(file) != sha:
            raise CheckpointError(f"{where} (its sha256 differs from {MANIFEST})")
    return read_trainer_state(path)


def read_trainer_state(path: str) -> dict[str, Any]:
    """The ``trainer_state.json`` of checkpoint ``path``: a dict with an integer ``step``."""
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as handle:
            state = json.load(handle)
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no integer 'step'")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: trainer_state.json is unreadable ({exc})") from None
    return state


def find_checkpoint(directory: str | None) -> tuple[str | None, dict[str, Any] | None, list[str]]:
    """The newest checkpoint in ``directory`` that verifies: ``(path, trainer state, problems)``.

    ``problems`` lists one line per newer checkpoint that was skipped as damaged (also logged as a
    warning). Raises :class:`CheckpointError` when checkpoints exist but none verifies."""
    problems: list[str] = []
    for path in list_checkpoints(directory):
        try:
            return path, verify_checkpoint(path), problems
        except CheckpointError as exc:
            logger.warning("%s; trying the previous checkpoint", exc)
            problems.append(str(exc))
    if problems:
        raise CheckpointError(f"{problems[0]}; no earlier good checkpoint in {directory}")
    return None, None, problems


def latest_checkpoint(directory: str | None) -> str | None:
    """Path of the newest checkpoint in ``directory`` that verifies (None when there is none)."""
    return find_checkpoint(directory)[0]


def remove_checkpoints(directory: str | None) -> None:
    """Delete every checkpoint folder and the ``latest`` pointer in ``directory`` (starting over)."""
    for path in list_checkpoints(directory):
        shutil.rmtree(path)
    if directory and os.path.isfile(os.path.join(directory, LATEST)):
        os.unlink(os.path.join(directory, LATEST))
    if directory:
        remove_stale_temporaries(directory)


def load_checkpoint(
    path: str, model: torch.nn.Module, optimizer, scheduler, *, verified: bool = False
) -> tuple[dict, dict]:
    """Restore model weights, optimizer and scheduler in place; returns (objective state, trainer state).

    The checkpoint is verified against its manifest first (skip with ``verified=True`` when
    :func:`verify_checkpoint` has just done it)."""
    trainer_state = None if verified else verify_checkpoint(path)

    def read(name, loader):
        try:
            return loader(os.path.join(path, name))
        except Exception as exc:  # a verified file that still does not parse: another writer's format
            raise CheckpointError(f"checkpoint {path}: {name} cannot be read ({exc})") from None

    tensors = read("model.safetensors", load_file)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise UserError(f"checkpoint {path}: no weights for {missing[:5]}: was it made for another model?")
    for name, param in params.items():
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise UserError(f"checkpoint {path}: {name} has shape {tuple(tensors[name].shape)}")
    state = read("optimizer.pt", lambda f: torch.load(f, map_location="cpu", weights_only=False))
    objective_state = read("objective.safetensors", load_file)
    if trainer_state is None:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as handle:
            trainer_state = json.load(handle)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    return objective_state, trainer_state
