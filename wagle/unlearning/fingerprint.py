"""Run fingerprints: what a checkpoint belongs to, so a run is resumed only with the same inputs.

A fingerprint is a flat mapping ``setting -> value`` (JSON scalars and strings): digests of the
starting weights, the mask and the encoded forget/retain data, and every option that changes the
numbers of a run (method and its settings, optimizer, learning-rate schedule, steps, batching,
lengths, seed, dtypes, clipping, step-in-backward). :func:`compare` lists what differs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from wagle.errors import UserError
from wagle.mask import WeightMask


class ResumeMismatchError(UserError):
    """A checkpoint folder holds a run with other settings; ``changes`` lists ``(setting, old, new)``."""

    def __init__(self, directory: str, changes: Sequence[tuple[str, Any, Any]]):
        self.directory = directory
        self.changes = list(changes)
        listed = "; ".join(f"{key} {short(old)} -> {short(new)}" for key, old, new in self.changes)
        super().__init__(
            f"{directory} holds a run with other settings ({listed}); to start over pass resume=False "
            "or use another checkpoint folder"
        )


def short(value: Any) -> str:
    """A value for a one-line message: digests shortened to 12 hex digits."""
    text = str(value)
    if "sha256:" in text:
        head, _, digest = text.partition("sha256:")
        return f"{head}sha256:{digest[:12]}"
    return text


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    return memoryview(flat.view(torch.uint8).numpy())


def weights_digest(model: torch.nn.Module) -> str:
    """``sha256:`` over every parameter's name, dtype, shape and bytes (``named_parameters`` order)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(f"{name}:{param.dtype}:{tuple(param.shape)}\n".encode())
        digest.update(_tensor_bytes(param))
    return f"sha256:{digest.hexdigest()}"


def mask_digest(mask: WeightMask | None) -> str:
    """``sha256:`` over the mask's names, shapes and packed bits (``none`` without a mask)."""
    if mask is None:
        return "none"
    digest = hashlib.sha256()
    for name in mask.names:
        digest.update(f"{name}:{tuple(mask.shape(name))}\n".encode())
        digest.update(_tensor_bytes(mask.packed(name)))
    return f"sha256:{digest.hexdigest()}"


def examples_digest(examples: Iterable[Mapping[str, Any]] | None) -> str:
    """``N examples, sha256:...`` over the encoded examples (token ids, labels, indices)."""
    if examples is None:
        return "none"
    digest, count = hashlib.sha256(), 0
    for example in examples:
        digest.update(json.dumps(example, sort_keys=True, separators=(",", ":")).encode())
        digest.update(b"\n")
        count += 1
    return f"{count} examples, sha256:{digest.hexdigest()}"


def normalised(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(dict(fingerprint)))


def compare(saved: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(setting, saved value, current value)`` for every setting that differs, in ``current``'s order
    (a setting missing on one side shows as ``missing``)."""
    saved = normalised(saved or {})
    current = normalised(current)
    keys = list(current) + [k for k in saved if k not in current]
    missing = "missing"
    return [
        (key, saved.get(key, missing), current.get(key, missing))
        for key in keys
        if saved.get(key, missing) != current.get(key, missing)
    ]
