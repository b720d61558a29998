"""Loading and saving local Hugging Face causal LMs (never from a hub)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def load_model(
    path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
):
    """``(model, tokenizer)`` from a local causal-LM directory (config.json + weights + tokenizer)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model: {path} does not exist")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"model: {path} is not a directory (expected a Hugging Face model folder)")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"model: {path} has no config.json (not a Hugging Face model folder)")
    with open(config_path) as handle:
        config = json.load(handle)
    architectures = config.get("architectures") or []
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise ValueError(f"model: {path} is a {architectures[0]}, not a causal language model")
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(
            f"model: could not load a causal LM from {path}: {str(exc).splitlines()[0][:200]}"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model: {path} has no usable tokenizer: {str(exc).splitlines()[0][:200]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model.to(device)
    return model, tokenizer


def save_model(model, tokenizer, path: str | os.PathLike) -> None:
    """Save model + tokenizer into ``path`` atomically: written to a temp folder beside it, then
    renamed into place (an existing folder is replaced only after the new one is complete)."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-model-", dir=parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=".old-model-", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
