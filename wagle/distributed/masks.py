"""``ShardedMask``: the part of a :class:`~wagle.WeightMask` one rank holds, and its files.

Each rank holds, per parameter, the bits of one contiguous flat range ``[offset, offset + numel)``
(packed from element ``offset`` on, as :mod:`wagle_kernels.bitpack` packs). :meth:`ShardedMask.gather`
assembles the full mask on every rank (two all-gathers); :meth:`ShardedMask.local` gives the local
bits as a ``WeightMask`` over the local shapes (what the masked optimizers step on a shard).

Files: :meth:`ShardedMask.save` writes one safetensors file per rank, ``mask-{rank}-of-{world}.safetensors``
(its ranges in the metadata), and rank 0 writes ``mask.index.json`` (shapes, fingerprint, files,
total selected). :func:`load_sharded` reads such a folder, or a single-file mask, for any set of
ranges: any world size, including the full mask at world size 1.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from wagle.errors import UserError
from wagle.files import atomic_write, atomic_write_text
from wagle.mask import FORMAT_NAME, FORMAT_VERSION, WeightMask, fingerprint_shapes
from wagle_kernels.bitpack import pack_bits, packed_size, popcount, unpack_bits

INDEX_NAME = "mask.index.json"
SHARDED_FORMAT = "wagle-mask-sharded"
ShapeLike = tuple[int, ...]


def shard_file_name(rank: int, world_size: int) -> str:
    return f"mask-{rank:05d}-of-{world_size:05d}.safetensors"


@dataclass(frozen=True)
class MaskPart:
    """Bits of parameter elements ``[offset, offset + numel)``; ``local_shape`` as the rank holds them."""

    offset: int
    numel: int
    packed: torch.Tensor
    local_shape: ShapeLike | None = None

    def __post_init__(self):
        if self.packed.dtype != torch.uint8 or self.packed.dim() != 1:
            raise UserError("MaskPart: packed bits must be a 1-D uint8 tensor")
        if self.packed.numel() != packed_size(self.numel):
            raise UserError(f"MaskPart: {self.packed.numel()} bytes do not hold {self.numel} bits")
        if self.local_shape is not None and math.prod(self.local_shape) != self.numel:
            raise UserError(f"MaskPart: local shape {self.local_shape} does not hold {self.numel} elements")

    @property
    def shape(self) -> ShapeLike:
        return tuple(self.local_shape) if self.local_shape is not None else (self.numel,)


def _bits_of_range(sources: list[tuple[int, int, torch.Tensor]], lo: int, hi: int, name: str) -> torch.Tensor:
    """Packed bits of elements [lo, hi) from (offset, numel, packed) pieces that together cover them."""
    out = torch.zeros(hi - lo, dtype=torch.bool)
    covered = 0
    for offset, numel, packed in sources:
        a, b = max(lo, offset), min(hi, offset + numel)
        if a >= b:
            continue
        bits = unpack_bits(packed.cpu(), numel)
        out[a - lo : b - lo] = bits[a - offset : b - offset]
        covered += b - a
    if covered != hi - lo:
        raise UserError(f"mask parts of {name!r} cover {covered} of the {hi - lo} elements [{lo}, {hi})")
    return pack_bits(out)


class ShardedMask:
    """This rank's bits of a mask over ``shapes`` (all parameters, full shapes, in global order)."""

    def __init__(
        self,
        shapes: Mapping[str, ShapeLike],
        parts: Mapping[str, MaskPart],
        metadata: Mapping[str, str] | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
        for name, part in parts.items():
            if name not in self.shapes:
                raise UserError(f"ShardedMask: part for unknown parameter {name!r}")
            if part.offset < 0 or part.offset + part.numel > math.prod(self.shapes[name]):
                raise UserError(f"ShardedMask: part of {name!r} lies outside its shape {self.shapes[name]}")
        self.parts = dict(parts)
        self.metadata = dict(metadata or {})
        self.rank = rank
        self.world_size = world_size

    def __repr__(self) -> str:
        return (
            f"ShardedMask(rank {self.rank}/{self.world_size}, {len(self.parts)} local parts, "
            f"{self.num_selected_local} selected locally)"
        )

    @property
    def fingerprint(self) -> str:
        return fingerprint_shapes(self.shapes)

    @property
    def num_selected_local(self) -> int:
        return sum(popcount(p.packed) for p in self.parts.values())

    def local(self) -> WeightMask:
        """This rank's bits as a :class:`~wagle.WeightMask` over the local shapes (same metadata)."""
        return WeightMask({name: (p.shape, p.packed) for name, p in self.parts.items()}, self.metadata)

    def ranges(self) -> dict[str, tuple[int, int]]:
        """``name -> (offset, numel)`` of the local parts."""
        return {name: (p.offset, p.numel) for name, p in self.parts.items()}

    def gather(self, comm=None) -> WeightMask:
        """The full mask on every rank (a collective: two all-gathers, of the part table and the bits)."""
        from .comm import collectives

        comm = collectives(comm)
        names = list(self.shapes)
        table = torch.full((len(names), 2), -1, dtype=torch.int64)
        for i, name in enumerate(names):
            part = self.parts.get(name)
            if part is not None:
                table[i] = torch.tensor([part.offset, part.numel])
        tables = comm.all_gather(table)
        sizes = [sum(packed_size(int(n)) for n in t[:, 1].tolist() if n >= 0) for t in tables]
        buffer = torch.zeros(max(max(sizes), 1), dtype=torch.uint8)
        at = 0
        for name in names:
            part = self.parts.get(name)
            if part is not None:
                buffer[at : at + part.packed.numel()] = part.packed.cpu()
                at += part.packed.numel()
        buffers = comm.all_gather(buffer)
        pieces: dict[str, list[tuple[int, int, torch.Tensor]]] = {name: [] for name in names}
        for t, data in zip(tables, buffers, strict=True):
            at = 0
            for i, (offset, numel) in enumerate(t.tolist()):
                if numel < 0:
                    continue
                size = packed_size(numel)
                pieces[names[i]].append((offset, numel, data[at : at + size]))
                at += size
        entries = {}
        for name, shape in self.shapes.items():
            entries[name] = (shape, _bits_of_range(pieces[name], 0, math.prod(shape), name))
        return WeightMask(entries, self.metadata)

    @classmethod
    def from_mask(
        cls,
        mask: WeightMask,
        ranges: Mapping[str, tuple[int, int]],
        local_shapes: Mapping[str, ShapeLike] | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> ShardedMask:
        """The parts ``name -> (offset, numel)`` of a full mask (a single-file mask on a sharded model)."""
        parts = {}
        for name, (offset, numel) in ranges.items():
            if name not in mask:
                raise UserError(f"mask has no entry for parameter {name!r}")
            total = math.prod(mask.shape(name))
            if offset < 0 or offset + numel > total:
                raise UserError(
                    f"range [{offset}, {offset + numel}) of {name!r} lies outside its {total} elements"
                )
            packed = _bits_of_range([(0, total, mask.packed(name))], offset, offset + numel, name)
            shape = None if local_shapes is None else tuple(local_shapes[name])
            parts[name] = MaskPart(offset, numel, packed, shape)
        return cls(mask.shapes, parts, mask.metadata, rank=rank, world_size=world_size)

    # ---- files -------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, comm=None) -> None:
        """Write this rank's file, then (rank 0, after every rank wrote) ``mask.index.json``.

        A collective: every rank calls it with the same folder (a shared file system).
        """
        from .comm import collectives

        comm = collectives(comm)
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        rank, world = comm.rank, comm.world_size
        tensors = {name: p.packed.detach().to("cpu", copy=True) for name, p in self.parts.items()}
        ranges = {name: [p.offset, p.numel] for name, p in self.parts.items()}
        metadata = {
            "format": SHARDED_FORMAT,
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "ranges": json.dumps(ranges),
        }
        path = os.path.join(directory, shard_file_name(rank, world))
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        selected = int(comm.all_reduce_sum(torch.tensor([self.num_selected_local], dtype=torch.int64))[0])
        if rank == 0:  # the all-reduce above returns once every rank has written its file
            index = {
                "format": SHARDED_FORMAT,
                "format_version": FORMAT_VERSION,
                "base_format": FORMAT_NAME,
                "world_size": world,
                "files": [shard_file_name(r, world) for r in range(world)],
                "shapes": {name: list(shape) for name, shape in self.shapes.items()},
                "fingerprint": self.fingerprint,
                "num_selected": selected,
                "numel": sum(math.prod(s) for s in self.shapes.values()),
                "metadata": {k: str(v) for k, v in self.metadata.items()},
            }
            atomic_write_text(os.path.join(directory, INDEX_NAME), json.dumps(index, indent=1) + "\n")
        comm.all_reduce_sum(torch.zeros(1, dtype=torch.int64))  # the index exists before anyone returns


def _read_index(directory: str) -> dict:
    path = os.path.join(directory, INDEX_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no {INDEX_NAME} (not a sharded wagle mask folder)")
    with open(path) as handle:
        index = json.load(handle)
    if index.get("format") != SHARDED_FORMAT:
        raise UserError(f"{path}: not a sharded wagle mask index (format={index.get('format')!r})")
    return index


def _pieces(directory: str, index: dict, names) -> dict[str, list[tuple[int, int, torch.Tensor]]]:
    """Every file's parts of ``names`` as (offset, numel, packed)."""
    wanted = set(names)
    pieces: dict[str, list] = {name: [] for name in names}
    for file_name in index["files"]:
        path = os.path.join(directory, file_name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: a file of the sharded mask is missing")
        with safe_open(path, framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("fingerprint") != index["fingerprint"]:
                raise UserError(f"{path}: belongs to another mask (fingerprint differs from the index)")
            for name, (offset, numel) in json.loads(meta["ranges"]).items():
                if name in wanted:
                    pieces[name].append((int(offset), int(numel), handle.get_tensor(name)))
    return pieces


def load_sharded(
    path: str | os.PathLike,
    ranges: Mapping[str, tuple[int, int]] | None = None,
    local_shapes: Mapping[str, ShapeLike] | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> WeightMask | ShardedMask:
    """Read a sharded mask folder (or a single-file mask).

    ``ranges=None`` returns the full :class:`~wagle.WeightMask` (equal to the single-file mask);
    otherwise the :class:`ShardedMask` of the given ``name -> (offset, numel)`` ranges (any world size).
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        mask = WeightMask.load(path)
        if ranges is None:
            return mask
        return ShardedMask.from_mask(mask, ranges, local_shapes, rank=rank, world_size=world_size)
    index = _read_index(path)
    shapes = {name: tuple(shape) for name, shape in index["shapes"].items()}
    if fingerprint_shapes(shapes) != index["fingerprint"]:
        raise UserError(f"{path}: corrupted index (fingerprint does not match its shapes)")
    metadata = index.get("metadata", {})
    if ranges is None:
        pieces = _pieces(path, index, shapes)
        entries = {
            name: (shape, _bits_of_range(pieces[name], 0, math.prod(shape), name))
            for name, shape in shapes.items()
        }
        mask = WeightMask(entries, metadata)
        if mask.num_selected != index["num_selected"]:
            raise UserError(
                f"{path}: {mask.num_selected} selected weights, the index says {index['num_selected']}"
            )
        return mask
    unknown = [name for name in ranges if name not in shapes]
    if unknown:
        raise UserError(f"{path}: the mask has no parameter(s) {unknown[:5]}")
    pieces = _pieces(path, index, list(ranges))
    parts = {}
    for name, (offset, numel) in ranges.items():
        packed = _bits_of_range(pieces[name], offset, offset + numel, name)
        shape = None if local_shapes is None else tuple(local_shapes[name])
        parts[name] = MaskPart(offset, numel, packed, shape)
    return ShardedMask(shapes, parts, metadata, rank=rank, world_size=world_size)
