"""``WeightMask``: which weights of a model an unlearning method may update, stored at 1 bit/weight.

mask = 1 means "this weight is selected / updated". The mask keeps, per parameter name, the shape and
a packed uint8 tensor (see :mod:`wagle_kernels.bitpack` for the bit layout), so a 7B model's mask is
~0.84 GB instead of 6.7 GB as bool tensors. Files are safetensors with the shapes and a fingerprint of
the parameter names and shapes in the metadata; a mask made for another model is rejected.

Integrity: a file (format 2) stores every entry's selected count and sha256 of its packed bits, and a
digest over all entries; :meth:`WeightMask.load` verifies them and names the file in every error.
Files of format 1 (no checksums) are still read; their total selected count and size are verified,
which catches most, not all, damaged bytes. Masks made by :func:`wagle.attribute` record the whole
model's parameter layout (``model_fingerprint``: every parameter's name and shape, tied aliases
noted), so a mask applied to a model with parameters it does not cover is flagged unless it was made
for exactly that model (a deliberate subset: ``include``/``exclude`` or Wanda).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from wagle.errors import UserError, first_line
from wagle.files import atomic_write
from wagle_kernels.bitpack import pack_bits, packed_size, popcount, unpack_bits

FORMAT_NAME = "wagle-mask"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
# metadata keys written by save() itself (the rest is the mask's own metadata)
_FILE_KEYS = ("format", "format_version", "shapes", "order", "fingerprint", "num_selected", "numel")
_CHECK_KEYS = ("selected", "sha256", "digest")
PARTIAL_POLICIES = ("warn", "error", "allow")

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


def parameter_aliases(model: torch.nn.Module) -> dict[str, str]:
    """``{alias: name}`` for parameters reachable under a second name (tied weights): ``alias`` is
    absent from ``named_parameters()``, ``name`` is how it is listed there (e.g. ``lm_head.weight`` ->
    ``model.embed_tokens.weight``)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def model_fingerprint(model) -> str:
    """sha256 of a model's whole parameter layout: every parameter's ``name:shape`` (as
    ``named_parameters()`` lists them) and, for a module, every tied ``alias=name`` pair."""
    digest = hashlib.sha256(fingerprint_shapes(named_shapes(model)).encode())
    if isinstance(model, torch.nn.Module):
        for alias, name in sorted(parameter_aliases(model).items()):
            digest.update(f"{alias}={name}\n".encode())
    return digest.hexdigest()


def model_metadata(model: torch.nn.Module) -> dict[str, str]:
    """Metadata that records which model a mask was made for (see :meth:`WeightMask.check_compatible`)."""
    meta = {
        "model_fingerprint": model_fingerprint(model),
        "model_parameters": str(len(named_shapes(model))),
    }
    aliases = parameter_aliases(model)
    if aliases:
        meta["model_aliases"] = json.dumps(aliases, sort_keys=True)
    return meta


def _sha256(packed: torch.Tensor) -> str:
    data = packed.detach().to("cpu").contiguous().numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


def _digest(layout: list[tuple[str, ShapeLike, str]]) -> str:
    digest = hashlib.sha256()
    for name, shape, entry_sha in layout:
        digest.update(f"{name}:{','.join(map(str, shape))}:{entry_sha}\n".encode())
    return digest.hexdigest()


class MaskMismatchError(UserError):
    """A mask does not belong to the model (names or shapes differ, or it leaves parameters uncovered)."""


class MaskFileError(UserError):
    """A mask file is unreadable or damaged (the message names the file)."""


class PartialMaskWarning(UserWarning):
    """The model has parameters a mask does not cover, and the mask was not made for this model."""


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
                raise UserError(f"mask entry {name!r}: packed bits must be a 1-D uint8 tensor")
            numel = 1
            for d in shape:
                numel *= d
            if packed.numel() != packed_size(numel):
                raise UserError(
                    f"mask entry {name!r}: {packed.numel()} bytes do not hold {numel} bits of shape {shape}"
                )
            if counts is not None:
                self._entries[name] = _Entry(shape, packed, int(counts[name]))
                continue
            if numel % 8 and packed.numel() and int(packed[-1]) >> (numel % 8):
                raise UserError(f"mask entry {name!r}: padding bits past the last weight are set")
            self._entries[name] = _Entry(shape, packed, popcount(packed))
        self.metadata: dict[str, str] = dict(metadata or {})
        self._accepted_model: str | None = None  # a model this mask was accepted for with partial='allow'

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
        moved._accepted_model = self._accepted_model
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
    def check_compatible(self, model_or_params, *, require_all: bool = False, partial: str = "warn") -> None:
        """Raise :class:`MaskMismatchError` unless every mask entry exists in the model with the same shape.

        Model parameters without a mask entry stay frozen during unlearning. That is intended when the
        mask was made for this very model (its recorded ``model_fingerprint`` matches: a subset chosen
        with ``include``/``exclude`` or Wanda); otherwise (a mask of another model, e.g. one without
        the attention biases or with tied embeddings, or a mask recording no model) ``partial``
        decides: ``"warn"`` (a :class:`PartialMaskWarning`), ``"error"`` (:class:`MaskMismatchError`)
        or ``"allow"`` (later checks of this mask against the same model then stay quiet).
        ``require_all=True`` requires an entry for every model parameter.
        """
        if partial not in PARTIAL_POLICIES:
            raise UserError(f"partial: expected one of {list(PARTIAL_POLICIES)}, got {partial!r}")
        shapes = named_shapes(model_or_params)
        aliases = parameter_aliases(model_or_params) if isinstance(model_or_params, torch.nn.Module) else {}
        missing = [n for n in self._entries if n not in shapes]
        if missing:
            tied = [f"{n} is tied to {aliases[n]}" for n in missing if n in aliases]
            raise MaskMismatchError(
                f"mask was made for another model: parameter(s) {missing[:5]} not found in the model"
                + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
                + (f"; in this model {', '.join(tied[:3])} (a mask of an untied model?)" if tied else "")
            )
        for name, entry in self._entries.items():
            if tuple(shapes[name]) != entry.shape:
                raise MaskMismatchError(
                    f"mask was made for another model: parameter {name!r} has shape {tuple(shapes[name])} "
                    f"in the model but {entry.shape} in the mask"
                )
        unmasked = [n for n in shapes if n not in self._entries]
        if require_all and unmasked:
            raise MaskMismatchError(f"mask has no entry for model parameter(s) {unmasked[:5]}")
        if not unmasked:
            return
        actual = model_fingerprint(model_or_params)
        recorded = self.metadata.get("model_fingerprint")
        if recorded == actual or self._accepted_model == actual:
            return  # made for this model (the uncovered parameters were left out on purpose), or accepted
        if partial == "allow":
            self._accepted_model = actual  # later checks against the same model stay quiet
            return
        why = (
            "was made for another model (its parameter fingerprint differs)"
            if recorded is not None
            else "records no model (made by an older wagle, or built from a dict)"
        )
        message = (
            f"mask covers {len(self._entries)} of the model's {len(shapes)} parameters but {why}; "
            f"{len(unmasked)} parameter(s) would stay frozen: {unmasked[:5]}"
            + (f" (+{len(unmasked) - 5} more)" if len(unmasked) > 5 else "")
        )
        if partial == "error":
            raise MaskMismatchError(f"{message}; to accept, pass partial='allow' (CLI: --allow-partial-mask)")
        warnings.warn(message, PartialMaskWarning, stacklevel=2)

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
    @property
    def digest(self) -> str:
        """sha256 over every entry's name, shape and packed bits (in order): identifies the mask's content."""
        return _digest([(n, e.shape, _sha256(e.packed)) for n, e in self._entries.items()])

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file atomically (temp file in the same folder, then rename), with each
        entry's selected count and sha256 and a digest over all entries, verified by :meth:`load`."""
        path = os.fspath(path)
        # copies: packed bits may be views into one shared buffer, which safetensors refuses
        tensors = {name: e.packed.detach().to("cpu", copy=True) for name, e in self._entries.items()}
        checksums = {name: _sha256(t) for name, t in tensors.items()}
        own = {k: str(v) for k, v in self.metadata.items() if k not in _FILE_KEYS + _CHECK_KEYS}
        metadata = {
            **own,
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "shapes": json.dumps({name: list(e.shape) for name, e in self._entries.items()}),
            "order": json.dumps(list(self._entries)),
            "fingerprint": self.fingerprint,
            "num_selected": str(self.num_selected),
            "numel": str(self.numel),
            "selected": json.dumps({name: e.num_selected for name, e in self._entries.items()}),
            "sha256": json.dumps(checksums),
            "digest": _digest([(n, e.shape, checksums[n]) for n, e in self._entries.items()]),
        }
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        model=None,
        *,
        device: str | torch.device = "cpu",
        partial: str = "warn",
    ) -> WeightMask:
        """Read a mask written by :meth:`save`, verifying its checksums (format 2) or its selected
        count (format 1); with ``model`` (module or name -> tensor mapping) also check it belongs to
        that model (``partial``: see :meth:`check_compatible`). Raises :class:`MaskFileError` naming
        the file for an unreadable or damaged file."""
        path = os.fspath(path)
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "is a directory, not a mask file", path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"mask file not found: {path}")
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
        except OSError:
            raise
        except Exception as exc:  # safetensors raises its own error types
            raise MaskFileError(f"{path}: not a safetensors mask file ({first_line(exc, None)})") from None
        if metadata.get("format") != FORMAT_NAME:
            raise MaskFileError(f"{path}: not a wagle mask file (metadata format={metadata.get('format')!r})")
        version = metadata.get("format_version")
        if version not in READABLE_VERSIONS:
            raise MaskFileError(
                f"{path}: mask format version {version!r} is not one this wagle reads "
                f"({', '.join(READABLE_VERSIONS)}): written by a newer wagle, or damaged"
            )
        layout = _read_layout(path, metadata, checked=version != "1")
        try:
            tensors = load_file(path, device="cpu")
        except Exception as exc:
            raise MaskFileError(f"{path}: damaged mask file ({first_line(exc, None)})") from None
        if set(tensors) != set(layout.order):
            raise MaskFileError(
                f"{path}: damaged mask file (its tensors do not match the names in its metadata)"
            )
        try:
            mask = cls({name: (layout.shapes[name], tensors[name]) for name in layout.order}, layout.own)
        except ValueError as exc:
            raise MaskFileError(f"{path}: damaged mask file ({exc})") from None
        if mask.fingerprint != layout.fingerprint:
            raise MaskFileError(f"{path}: corrupted mask file (fingerprint does not match its shapes)")
        _verify(path, mask, layout)
        if torch.device(device) != torch.device("cpu"):
            mask = mask.to(device)
        if model is not None:
            mask.check_compatible(model, partial=partial)
        return mask


def masked_trainable(
    named_params, mask: WeightMask, *, keep_unselected: bool = False
) -> list[tuple[str, torch.nn.Parameter]]:
    """The ``(name, parameter)`` pairs a masked run trains, in the given order: those with
    ``requires_grad``, a mask entry and at least one selected weight (with ``keep_unselected``, any
    mask entry: fully unselected tensors then keep gradients, e.g. so that they enter the global
    gradient norm). Raises when none of them has a selected weight."""
    trainable = [
        (n, p)
        for n, p in named_params
        if n in mask and (mask.selected(n) > 0 or keep_unselected) and p.requires_grad
    ]
    if not any(mask.selected(n) > 0 for n, _ in trainable):
        raise UserError("mask: selects no weight of a trainable parameter; nothing to train")
    return trainable


@dataclass(frozen=True)
class _Layout:
    shapes: dict[str, ShapeLike]
    order: list[str]
    fingerprint: str
    num_selected: int | None
    numel: int | None
    selected: dict[str, int] | None
    sha256: dict[str, str] | None
    digest: str | None
    own: dict[str, str]


def _read_layout(path: str, metadata: dict[str, str], *, checked: bool) -> _Layout:
    """The file's own metadata, parsed and type-checked; any defect is a :class:`MaskFileError`."""

    def damaged(what: str) -> MaskFileError:
        return MaskFileError(f"{path}: damaged mask metadata ({what})")

    def parse(key: str, kind: type, required: bool = True):
        if key not in metadata:
            if required:
                raise damaged(f"{key!r} is missing")
            return None
        try:
            value = json.loads(metadata[key]) if kind is not int else int(metadata[key])
        except ValueError:
            raise damaged(f"{key!r} is not valid") from None
        if not isinstance(value, kind) or (kind is int and value < 0):
            raise damaged(f"{key!r} is not valid")
        return value

    shapes, order = parse("shapes", dict), parse("order", list)
    if (
        not all(isinstance(n, str) for n in order)
        or len(set(order)) != len(order)
        or set(order) != set(shapes)
    ):
        raise damaged("'order' and 'shapes' name different parameters")
    for name, shape in shapes.items():
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise damaged(f"shape of {name!r} is not a list of sizes")
    fingerprint = metadata.get("fingerprint")
    if not isinstance(fingerprint, str):
        raise damaged("'fingerprint' is missing")
    selected = parse("selected", dict, required=checked)
    sha = parse("sha256", dict, required=checked)
    digest = metadata.get("digest")
    if checked:
        if set(selected) != set(order) or set(sha) != set(order) or not isinstance(digest, str):
            raise damaged("the per-entry checksums do not name the mask's parameters")
        if not all(isinstance(v, int) for v in selected.values()):
            raise damaged("'selected' is not valid")
    return _Layout(
        shapes={name: tuple(shapes[name]) for name in order},
        order=order,
        fingerprint=fingerprint,
        num_selected=parse("num_selected", int, required=checked),
        numel=parse("numel", int, required=checked),
        selected=selected,
        sha256=sha,
        digest=digest,
        own={k: v for k, v in metadata.items() if k not in _FILE_KEYS + _CHECK_KEYS},
    )


def _verify(path: str, mask: WeightMask, layout: _Layout) -> None:
    """Compare the bits with the counts and checksums the file recorded when it was written."""
    if layout.numel is not None and mask.numel != layout.numel:
        raise MaskFileError(
            f"{path}: damaged mask file (holds {mask.numel} weights, recorded {layout.numel})"
        )
    if layout.selected is not None:
        for name in layout.order:
            if mask.selected(name) != layout.selected[name]:
                raise MaskFileError(
                    f"{path}: damaged mask file ({name!r} has {mask.selected(name)} selected weights, "
                    f"recorded {layout.selected[name]})"
                )
    if layout.num_selected is not None and mask.num_selected != layout.num_selected:
        raise MaskFileError(
            f"{path}: damaged mask file ({mask.num_selected} selected weights, "
            f"recorded {layout.num_selected})"
        )
    if layout.sha256 is not None:
        for name in layout.order:
            if _sha256(mask.packed(name)) != layout.sha256[name]:
                raise MaskFileError(f"{path}: damaged mask file (checksum of {name!r} does not match)")
        if _digest([(n, mask.shape(n), layout.sha256[n]) for n in layout.order]) != layout.digest:
            raise MaskFileError(f"{path}: damaged mask metadata (digest does not match the checksums)")
