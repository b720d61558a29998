"""The study's results file: a JSON-lines log that an interrupted study resumes from.

Line 1 is the header ``{"kind": "header", "format": 1, "fingerprint": ..., "study": {...}}``; every
later line is one finished record (``"kind": "reference"`` for the evaluation of the target and gold
models, ``"kind": "run"`` for one unlearning run), appended, flushed and fsynced as soon as it is
complete. A last line without its newline (the process died while writing it) is cut off when the file
is opened again, so that run is redone; a header of another study (other models, data, grid or
settings) is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from wagle.errors import UserError
from wagle.files import atomic_write_text

logger = logging.getLogger(__name__)

FORMAT = 1


def _sha256(chunks: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def model_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer: name, dtype, shape and bytes (state_dict order)."""

    def chunks():
        for name, tensor in model.state_dict().items():
            t = tensor.detach().to("cpu").contiguous()
            yield f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode()
            yield t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""

    return _sha256(chunks())


def tokenizer_digest(tokenizer) -> str:
    """sha256 of the tokenizer's full serialisation (fast tokenizers) or of its vocabulary and specials."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    specials = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    return _sha256([type(tokenizer).__name__.encode(), text.encode(), specials.encode()])


def data_digest(rows: Iterable[Mapping[str, Any]]) -> str:
    """sha256 of the rows as canonical JSON lines."""
    return _sha256(json.dumps(dict(r), sort_keys=True, default=str).encode() + b"\n" for r in rows)


def fingerprint(study: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the study description (digests, grid, settings)."""
    return hashlib.sha256(json.dumps(study, sort_keys=True, default=str).encode()).hexdigest()


class ResultsFile:
    """Open (or create) the results file of one study and append finished records to it."""

    def __init__(self, path: str | os.PathLike, study: Mapping[str, Any]):
        self.path = os.fspath(path)
        self.study = dict(study)
        self.fingerprint = fingerprint(self.study)
        self.records: list[dict] = []
        self.truncated = False
        if os.path.exists(self.path):
            self._read()
        else:
            header = {
                "kind": "header",
                "format": FORMAT,
                "fingerprint": self.fingerprint,
                "study": self.study,
            }
            atomic_write_text(self.path, json.dumps(header, sort_keys=True) + "\n")

    def _read(self) -> None:
        with open(self.path, "rb") as handle:
            data = handle.read()
        complete_end = data.rfind(b"\n") + 1
        if complete_end < len(data):  # a partial last line: the run being written when the process died
            logger.warning(
                "%s: cutting an incomplete last line (%d bytes); that run is redone",
                self.path,
                len(data) - complete_end,
            )
            with open(self.path, "r+b") as handle:
                handle.truncate(complete_end)
                handle.flush()
                os.fsync(handle.fileno())
            self.truncated = True
            data = data[:complete_end]
        lines = data.decode("utf-8").splitlines()
        if not lines:
            raise UserError(f"results: {self.path} is empty (no header); remove it or choose another --out")
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            raise UserError(f"results: {self.path} is not a wagle comparison results file") from None
        if not isinstance(header, dict) or header.get("kind") != "header" or "fingerprint" not in header:
            raise UserError(f"results: {self.path} is not a wagle comparison results file")
        if header.get("format") != FORMAT:
            raise UserError(f"results: {self.path} has format {header.get('format')!r}, expected {FORMAT}")
        if header["fingerprint"] != self.fingerprint:
            theirs = header.get("study", {})
            differ = sorted(k for k in set(theirs) | set(self.study) if theirs.get(k) != self.study.get(k))
            raise UserError(
                f"results: {self.path} belongs to another study (fingerprint {header['fingerprint'][:12]}, "
                f"this study {self.fingerprint[:12]}; differing: {', '.join(differ) or 'unknown'}); "
                "choose another output folder or remove the file"
            )
        for number, line in enumerate(lines[1:], start=2):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(
                    f"results: {self.path} line {number} is not valid JSON (corrupted file)"
                ) from None
            self.records.append(record)

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record as a line; flushed and fsynced before returning."""
        line = json.dumps(dict(record), sort_keys=True, allow_nan=False) + "\n"
        with open(self.path, "a", encoding="utf-8", newline="\n") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self.records.append(json.loads(line))

    def runs(self) -> dict[str, dict]:
        """Finished runs by key (the last record of a key wins)."""
        return {r["key"]: r for r in self.records if r.get("kind") == "run"}

    def references(self) -> dict[str, dict]:
        return {r["label"]: r for r in self.records if r.get("kind") == "reference"}
