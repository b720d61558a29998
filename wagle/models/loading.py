"""Loading and saving local Hugging Face causal LMs (never from a hub)."""

from __future__ import annotations

import json
import logging
import os
import shutil

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from wagle.errors import UserError, first_line
from wagle.files import replace_folder, temporary_folder

logger = logging.getLogger(__name__)

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _dtype_keyword() -> str:
    """``from_pretrained`` takes ``dtype=`` from transformers 4.56 on, ``torch_dtype=`` before."""
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


# Files from which AutoTokenizer can build a tokenizer (any one is enough); used for error messages only.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.tiktoken",
)


def _has_tokenizer_files(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name)) for name in _TOKENIZER_FILES)


def _check_causal_config(path: str) -> None:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"model: {path} has no config.json (not a Hugging Face model folder)")
    try:
        with open(config_path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"model: {config_path} is not valid JSON: {first_line(exc)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"model: {config_path} does not hold a JSON object")
    architectures = raw.get("architectures") or []
    if architectures and not any(a.endswith(_CAUSAL_SUFFIXES) for a in architectures):
        raise UserError(
            f"model: {path} is a {architectures[0]}, not a causal language model (expected an "
            f"architecture ending in {' / '.join(_CAUSAL_SUFFIXES)})"
        )
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"model: {path}: unusable config.json: {first_line(exc)}") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(
            f"model: {path} has model_type {config.model_type!r}, which has no causal language model class"
        )


def load_model(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` from a local causal-LM directory (config.json + weights + tokenizer).

    Nothing is downloaded (``local_files_only=True``). ``dtype`` casts the weights (default: as
    saved, or float32); the model is moved to ``device`` and put in eval mode. A tokenizer without a
    pad token gets its EOS token as pad token.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model: {path} does not exist")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"model: {path} is not a directory (expected a Hugging Face model folder)")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype such as torch.bfloat16, got {dtype!r}")
    _check_causal_config(path)
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs[_dtype_keyword()] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"model: could not load a causal LM from {path}: {first_line(exc)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        # A folder without tokenizer files, or with a corrupt one, gives OSError, ImportError (the
        # slow-tokenizer fallback, without protobuf) or ValueError, depending on the transformers
        # version (4.45 / 4.51 / 4.57 / 5.x differ).
        hint = "" if _has_tokenizer_files(path) else " (the folder has no tokenizer files)"
        raise UserError(f"model: {path} has no usable tokenizer{hint}: {first_line(exc)}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            logger.warning("tokenizer of %s has neither a pad nor an eos token", path)
        else:
            tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def save_model(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None, path: str | os.PathLike
) -> None:
    """Save model (safetensors) + tokenizer into the folder ``path``, atomically.

    Everything is written to a temporary folder beside ``path`` and renamed into place; an existing
    folder is replaced only once the new one is complete (and restored if the swap fails).
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"path: {path} exists and is not a directory")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = temporary_folder(parent, f".tmp-{os.path.basename(path)}-")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
