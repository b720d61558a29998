"""``WeightMask``: which weights of a model an unlearning method may update, stored at 1 bit/weight.

mask = 1 means "this weight is selected / updated". The mask keeps, per parameter name, the shape and
a packed uint8 tensor (see :mod:`wagle_kernels.bitpack` for the bit layout), so a 7B model's mask is
~0.84 GB instead of 6.7 GB as bool tensors. Files are safetensors with the shapes and a fingerprint of
the parameter names and shapes in the metadata; a mask made for another model is rejected.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from wagle.files import atomic_write
from wagle_kernels.bitpack import pack_bits, packed_size, popcount, unpack_bits

FORMAT_NAME = "wagle-mask"
FORMAT_VERSION = "1"

ShapeLike = tuple[int, ...]


def fingerprint_shapes(shapes: Mapping[str, ShapeLike]) -> str:
    """sha256 over ``name:shape`` lines in the given order: identifies a model's parameter layout."""
    digest = hashlib.sha256()
    for name, shape in shapes.items():
        digest.update(f"{name}:{','.join(str(int(d)) for d in shape)}\n".encode())
    return digest.hexdigest()


def named_shapes(source) -> dict[str, ShapeLike]:
    """Parameter shapes from an ``nn.Module``, a mapping name -> tensor/shape, or (name, tensor) pairs."""
    if isinstance(source, torch.nn.Module):
        return {name: tuple(p.shape) for name, p in source.named_parameters()}
    items = source.items() if isinstance(source, Mapping) else source
    shapes = {}
    for name, value in items:
        shapes[name] = tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(int(d) for d in value)
    return shapes


class MaskMismatchError(ValueError):
    """A mask does not belong to the model (names or shapes differ)."""


@dataclass(frozen=True)
class _Entry:
    shape: ShapeLike
    packed: torch.Tensor  # uint8, ceil(numel / 8) bytes
    num_selected: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class WeightMask(Mapping):
    """A bit-packed weight mask over named parameters (a read-only mapping name -> bool tensor).

    ``mask[name]`` unpacks that parameter's mask to a bool tensor of its shape. ``packed(name)`` gives
    the raw uint8 bits for kernels. Build one with :func:`wagle.mask_from_gradients`,
    :meth:`from_dict` (a ``{name: bool tensor}`` dict, the reference implementation's format) or
    :meth:`load`.
    """

    def __init__(
        self,
        entries: Mapping[str, tuple[ShapeLike, torch.Tensor]],
        metadata: Mapping[str, str] | None = None,
        *,
        counts: Mapping[str, int] | None = None,
    ):
        """``counts``: set bits per entry when the producer already counted them (the selection
        kernels do); the bits are then neither recounted nor their padding re-read (no host sync per
        tensor), so the producer guarantees zero padding bits."""
        self._entries: dict[str, _Entry] = {}
        for name, (shape, packed) in entries.items():
            shape = tuple(int(d) for d in shape)
            if packed.dtype != torch.uint8 or packed.dim() != 1:
                raise ValueError(f"mask entry {name!r}: packed bits must be a 1-D uint8 tensor")
            numel = 1
            for d in shape:
                numel *= d
            if packed.numel() != packed_size(numel):
                raise ValueError(
                    f"mask entry {name!r}: {packed.numel()} bytes do not hold {numel} bits of shape {shape}"
                )
            if counts is not None:
                self._entries[name] = _Entry(shape, packed, int(counts[name]))
                continue
            if numel % 8 and packed.numel() and int(packed[-1]) >> (numel % 8):
                raise ValueError(f"mask entry {name!r}: padding bits past the last weight are set")
            self._entries[name] = _Entry(shape, packed, popcount(packed))
        self.metadata: dict[str, str] = dict(metadata or {})

    # ---- mapping protocol -------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self._entry(name)
        return unpack_bits(entry.packed, entry.numel).view(entry.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (
            f"WeightMask({len(self)} tensors, {self.num_selected}/{self.numel} selected, "
            f"density={self.density:.4f})"
        )

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"mask has no entry for parameter {name!r}") from None

    # ---- accessors --------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._entries)

    @property
    def shapes(self) -> dict[str, ShapeLike]:
        return {name: e.shape for name, e in self._entries.items()}

    def shape(self, name: str) -> ShapeLike:
        return self._entry(name).shape

    def packed(self, name: str) -> torch.Tensor:
        """The packed uint8 bits of one parameter (little-endian bit order)."""
        return self._entry(name).packed

    def selected(self, name: str) -> int:
        """Number of selected weights in one parameter."""
        return self._entry(name).num_selected

    @property
    def num_selected(self) -> int:
        return sum(e.num_selected for e in self._entries.values())

    @property
    def numel(self) -> int:
        return sum(e.numel for e in self._entries.values())

    @property
    def density(self) -> float:
        """Fraction of selected weights over all masked parameters (0 for an empty mask)."""
        n = self.numel
        return self.num_selected / n if n else 0.0

    def densities(self) -> dict[str, float]:
        """Per-parameter fraction of selected weights."""
        return {name: (e.num_selected / e.numel if e.numel else 0.0) for name, e in self._entries.items()}

    @property
    def fingerprint(self) -> str:
        return fingerprint_shapes(self.shapes)

    @property
    def nbytes(self) -> int:
        return sum(e.packed.numel() for e in self._entries.values())

    def to(self, device: torch.device | str) -> WeightMask:
        """A copy with the packed bits on ``device`` (entries already validated and counted)."""
        moved = WeightMask({}, self.metadata)
        moved._entries = {
            name: _Entry(e.shape, e.packed.to(device), e.num_selected) for name, e in self._entries.items()
        }
        return moved

    def summary_rows(self) -> list[tuple[str, ShapeLike, int, int, float]]:
        """``(name, shape, selected, numel, density)`` per parameter, for a summary table."""
        return [
            (n, e.shape, e.num_selected, e.numel, e.num_selected / e.numel if e.numel else 0.0)
            for n, e in self._entries.items()
        ]

    def summary(self, max_rows: int | None = None) -> str:
        """A readable table of per-parameter densities and the total."""
        rows = self.summary_rows()
        shown = rows if max_rows is None else rows[:max_rows]
        width = max([len("parameter")] + [len(r[0]) for r in shown])
        lines = [f"{'parameter':<{width}}  {'shape':>18}  {'selected':>12}  {'numel':>12}  density"]
        for name, shape, sel, numel, dens in shown:
            lines.append(f"{name:<{width}}  {str(tuple(shape)):>18}  {sel:>12}  {numel:>12}  {dens:7.4f}")
        if len(shown) < len(rows):
            lines.append(f"... {len(rows) - len(shown)} more parameters")
        lines.append(
            f"{'total':<{width}}  {'':>18}  {self.num_selected:>12}  {self.numel:>12}  {self.density:7.4f}"
        )
        return "\n".join(lines)

    # ---- compatibility ----------------------------------------------------------------------
    def check_compatible(self, model_or_params, *, require_all: bool = False) -> None:
        """Raise :class:`MaskMismatchError` unless every mask entry exists in the model with the same shape.

        ``require_all=True`` also requires every model parameter to have a mask entry.
        """
        shapes = named_shapes(model_or_params)
        missing = [n for n in self._entries if n not in shapes]
        if missing:
            raise MaskMismatchError(
                f"mask was made for another model: parameter(s) {missing[:5]} not found in the model"
                + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
            )
        for name, entry in self._entries.items():
            if tuple(shapes[name]) != entry.shape:
                raise MaskMismatchError(
                    f"mask was made for another model: parameter {name!r} has shape {tuple(shapes[name])} "
                    f"in the model but {entry.shape} in the mask"
                )
        if require_all:
            unmasked = [n for n in shapes if n not in self._entries]
            if unmasked:
                raise MaskMismatchError(f"mask has no entry for model parameter(s) {unmasked[:5]}")

    # ---- conversion ---------------------------------------------------------------------------
    @classmethod
    def from_dict(
        cls, masks: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
    ) -> WeightMask:
        """From ``{name: tensor}`` where nonzero means selected (bool, or 0/1 of any dtype, as released
        by the reference implementation)."""
        entries = {}
        for name, value in masks.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"masks[{name!r}]: expected a tensor, got {type(value).__name__}")
            if value.is_complex():
                raise TypeError(f"masks[{name!r}]: complex masks are not supported")
            flags = value if value.dtype == torch.bool else value.ne(0)
            entries[name] = (tuple(value.shape), pack_bits(flags))
        return cls(entries, metadata)

    def to_dict(self) -> dict[str, torch.Tensor]:
        """``{name: bool tensor}``: the reference implementation's mask format."""
        return {name: self[name] for name in self._entries}

    # ---- files --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file atomically (temp file in the same folder, then rename)."""
        path = os.fspath(path)
        # copies: packed bits may be views into one shared buffer, which safetensors refuses
        tensors = {name: e.packed.detach().to("cpu", copy=True) for name, e in self._entries.items()}
        metadata = {
            **{k: str(v) for k, v in self.metadata.items()},
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "shapes": json.dumps({name: list(e.shape) for name, e in self._entries.items()}),
            "order": json.dumps(list(self._entries)),
            "fingerprint": self.fingerprint,
            "num_selected": str(self.num_selected),
            "numel": str(self.numel),
        }
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike, model=None, *, device: str | torch.device = "cpu") -> WeightMask:
        """Read a mask written by :meth:`save`; with ``model`` (module or name -> tensor mapping) also
        check it belongs to that model."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"mask file not found: {path}")
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(f"{path}: not a safetensors mask file ({exc})") from exc
        if metadata.get("format") != FORMAT_NAME:
            raise ValueError(f"{path}: not a wagle mask file (metadata format={metadata.get('format')!r})")
        shapes = json.loads(metadata.pop("shapes"))
        order = json.loads(metadata.pop("order"))
        fingerprint = metadata.pop("fingerprint")
        for key in ("format", "format_version", "num_selected", "numel"):
            metadata.pop(key, None)
        tensors = load_file(path, device=str(device))
        mask = cls({name: (tuple(shapes[name]), tensors[name]) for name in order}, metadata)
        if mask.fingerprint != fingerprint:
            raise ValueError(f"{path}: corrupted mask file (fingerprint does not match its shapes)")
        if model is not None:
            mask.check_compatible(model)
        return mask
