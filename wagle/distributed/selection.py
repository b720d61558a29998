"""Exact global top-k selection over weights spread across ranks, as one device would select them.

Each rank passes :class:`Segment` s: a contiguous flat range ``[offset, offset + numel)`` of a named
parameter with the matching flat slices of the weight and gradients. FSDP2 shards (``Shard(0)`` rows),
ranges of reduce-scattered gradients (DDP) and ZeRO fragments all enter this way. Every rank passes the
same ``shapes`` (all parameter names and full shapes, in the order that defines global positions:
parameter ``j`` starts at ``sum(numel of parameters before j)``).

Algorithm (the radix select of :mod:`wagle_kernels.select`, with collectives between the passes):

1. Keys ``bits(S) + 1`` of the local scores (the backend's selector, one per segment).
2. Non-finite counts per parameter: one SUM all-reduce of ``len(shapes)`` int64.
3. Per radix digit (11, 10, 10 bits): the local histogram of the digit of keys under the prefix found so
   far, summed over ranks by one SUM all-reduce; every rank then picks the same bin. ``per_tensor``
   scope batches all parameters still undecided into that one all-reduce (a ``[tensors, bins]`` tensor).
   Bytes per rank per selection: at most (2^11 + 2 * 2^10) * 8 = 32 KiB per ranking, independent of the
   number of weights.
4. Ties at the threshold key ``T`` go to the lowest global positions: each rank counts its keys equal to
   ``T`` per segment, one all-gather of ``(offset, count)`` per tied parameter gives every segment the
   number of tied keys before it, and it selects ``clamp(ties - before, 0, count)`` of its own.
5. Each segment writes its packed bits (:class:`~wagle.distributed.masks.ShardedMask` holds them).

The ``random`` method's seed is drawn on rank 0 and broadcast when none is given. The result is bit
for bit the mask :func:`wagle.mask_from_gradients` computes on the full tensors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from wagle.attribution.from_gradients import (
    SUPPORTED_DTYPES,
    check_selection_options,
    draw_seed,
    num_to_select,
    score_spec,
    selector_class,
)
from wagle.errors import UserError
from wagle.validation import check_seed
from wagle_kernels.select import (
    RADIX_DIGITS,
    ScoreSource,
    Threshold,
    pick_bin,
)

from .comm import CommStats, collectives
from .masks import MaskPart, ShardedMask

ShapeLike = tuple[int, ...]


@dataclass
class Segment:
    """A contiguous flat range of parameter ``name`` held by this rank (tensors: its flat slices)."""

    name: str
    offset: int
    numel: int
    weight: torch.Tensor | None = None
    grad_forget: torch.Tensor | None = None
    grad_retain: torch.Tensor | None = None
    local_shape: ShapeLike | None = None  # how the owner holds the slice (e.g. an FSDP2 shard's shape)


@dataclass
class ShardedSelectionStats:
    """What a sharded selection did: collective rounds, bytes this rank sent, non-finite counts."""

    radix_passes: int = 0
    tie_gathers: int = 0
    local_histogram_passes: int = 0
    nonfinite: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase on this rank
    comm: CommStats = field(default_factory=CommStats)


def _flat_input(value, segment: Segment, argument: str) -> torch.Tensor:
    if value is None:
        raise UserError(f"segment {segment.name!r}: {argument} is missing (None)")
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
        raise TypeError(f"segment {segment.name!r}: {argument} must be a dense tensor")
    if value.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"segment {segment.name!r}: {argument} dtype {value.dtype} is not supported")
    if value.numel() != segment.numel:
        raise UserError(
            f"segment {segment.name!r}: {argument} has {value.numel()} elements, the segment {segment.numel}"
        )
    return value.detach().reshape(-1).contiguous()


def _check_segments(
    shapes: Mapping[str, ShapeLike], segments: Sequence[Segment], uses: tuple[bool, bool, bool]
) -> list[Segment]:
    seen = set()
    checked = []
    for seg in segments:
        if not isinstance(seg, Segment):
            raise TypeError(f"segments: expected Segment objects, got {type(seg).__name__}")
        if seg.name not in shapes:
            raise UserError(f"segments: parameter {seg.name!r} is not in shapes")
        if seg.name in seen:
            raise UserError(f"segments: parameter {seg.name!r} has two segments on this rank")
        seen.add(seg.name)
        numel = math.prod(shapes[seg.name])
        if not (seg.offset >= 0 and seg.numel >= 0 and seg.offset + seg.numel <= numel):
            raise UserError(
                f"segments: range [{seg.offset}, {seg.offset + seg.numel}) of {seg.name!r} lies outside "
                f"its {numel} elements"
            )
        tensors = [
            _flat_input(t, seg, arg) if use else None
            for use, t, arg in zip(
                uses,
                (seg.weight, seg.grad_forget, seg.grad_retain),
                ("weight", "grad_forget", "grad_retain"),
                strict=True,
            )
        ]
        checked.append(Segment(seg.name, seg.offset, seg.numel, *tensors, local_shape=seg.local_shape))
    order = {name: i for i, name in enumerate(shapes)}
    return sorted(checked, key=lambda s: order[s.name])


def _device(segments: Sequence[Segment]) -> torch.device:
    devices = {t.device for s in segments for t in (s.weight, s.grad_forget, s.grad_retain) if t is not None}
    if len(devices) > 1:
        raise UserError(f"segments: tensors are on different devices {sorted(map(str, devices))}")
    return devices.pop() if devices else torch.device("cpu")


class _Clock:
    """Wall time per phase (device work synchronised) into ``seconds``."""

    def __init__(self, device: torch.device, seconds: dict[str, float]):
        self.device, self.seconds, self.start = device, seconds, time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.start
        self.start = now


def select_segments(
    shapes: Mapping[str, ShapeLike],
    segments: Sequence[Segment],
    *,
    ratio: float,
    method: str = "wagle",
    gamma: float = 1e-6,
    scope: str = "global",
    backend: str = "auto",
    seed: int | None = None,
    nonfinite: str = "error",
    comm=None,
    return_stats: bool = False,
) -> ShardedMask | tuple[ShardedMask, ShardedSelectionStats]:
    """Select the top ``ratio`` fraction of all weights (over every rank) by attribution score.

    A collective: every rank of ``comm`` (a process group, None for the world group, or an object with
    the methods of :class:`~wagle.distributed.comm.Collectives`) calls it with the same ``shapes`` and
    options and its own ``segments``. Scores, ``k = floor(ratio * N)``, scopes and tie-breaking (lower
    global position wins) are those of :func:`wagle.mask_from_gradients`; the returned
    :class:`ShardedMask` holds this rank's bits of that mask.
    """
    entry, ratio = check_selection_options(method, scope, backend, nonfinite, ratio, gamma)
    comm = collectives(comm)
    shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
    segments = _check_segments(shapes, segments, entry.reads)
    device = _device(segments)
    stats = ShardedSelectionStats()

    if entry.needs_seed:  # every rank must hash with the same seed
        local = draw_seed() if seed is None else int(seed)
        seed = int(comm.broadcast(torch.tensor([local], dtype=torch.int64))[0])
    else:
        seed = 0
    check_seed(seed)

    selector_cls = selector_class(backend, device, "select_segments")
    spec = score_spec(entry, gamma, seed)

    names = list(shapes)
    index = {name: i for i, name in enumerate(names)}
    numels = [math.prod(shapes[name]) for name in names]
    starts = [0] * len(names)
    for i in range(1, len(names)):
        starts[i] = starts[i - 1] + numels[i - 1]

    clock = _Clock(device, stats.seconds)
    selectors = {}
    for seg in segments:
        source = ScoreSource(
            seg.name,
            seg.numel,
            starts[index[seg.name]] + seg.offset,
            seg.weight,
            seg.grad_forget,
            seg.grad_retain,
        )
        selectors[seg.name] = selector_cls([source], spec, device=device)
    clock.lap("keys")

    # per parameter, summed over the ranks: elements covered by segments, non-finite scores
    local_counts = torch.zeros(len(names), 2, dtype=torch.int64)
    for seg in segments:
        sel = selectors[seg.name]
        counts = sel.nonfinite_counts()
        local_counts[index[seg.name]] = torch.tensor([seg.numel, int(counts.get(seg.name, 0))])
    covered, bad = comm.all_reduce_sum(local_counts).T.tolist()
    for i, name in enumerate(names):
        if covered[i] != numels[i]:
            raise UserError(
                f"segments: the ranks' segments of {name!r} hold {covered[i]} of its {numels[i]} elements "
                "(every element must be in exactly one segment)"
            )
    stats.nonfinite = {name: int(bad[i]) for i, name in enumerate(names)}
    clock.lap("counts")
    if nonfinite == "error" and entry.can_be_nonfinite:
        offenders = [(name, c) for name, c in stats.nonfinite.items() if c]
        if offenders:
            name, count = offenders[0]
            raise UserError(
                f"non-finite attribution score: {count} NaN/Inf score(s) in tensor {name!r}"
                + (f" and {len(offenders) - 1} more tensor(s)" if len(offenders) > 1 else "")
                + f" (method={method!r}); check the weights/gradients, or pass nonfinite='lowest'"
            )

    groups = [names] if scope == "global" else [[name] for name in names]
    local_of = [[seg for seg in segments if seg.name in set(group)] for group in groups]
    thresholds: list[Threshold | None] = []
    state = []  # per undecided group: [prefix, need]
    for group in groups:
        n = sum(numels[index[name]] for name in group)
        k = num_to_select(ratio, n)
        if k <= 0:
            thresholds.append(Threshold.nothing())
        elif k >= n:
            thresholds.append(Threshold.everything())
        else:
            thresholds.append(None)
        state.append([0, k])

    for shift, bits in RADIX_DIGITS:
        active = [g for g, t in enumerate(thresholds) if t is None]
        if not active:
            break
        hist = torch.zeros(len(active), 1 << bits, dtype=torch.int64)
        for row, g in enumerate(active):
            prefix = state[g][0]
            for seg in local_of[g]:
                if seg.numel:
                    hist[row] += selectors[seg.name].histogram(prefix, shift + bits, shift, bits).cpu()
        hist = comm.all_reduce_sum(hist)
        stats.radix_passes += 1
        for row, g in enumerate(active):
            digit, need, in_bin = pick_bin(hist[row], state[g][1])
            prefix = (state[g][0] << bits) | digit
            state[g] = [prefix, need]
            if need == in_bin:  # the whole bin is selected
                thresholds[g] = Threshold((prefix << shift) - 1, 0)
            elif shift == 0:
                thresholds[g] = Threshold(prefix, need)

    clock.lap("radix")
    ties_of = {seg.name: 0 for seg in segments}
    tied = [g for g, t in enumerate(thresholds) if t.ties > 0]
    if tied:
        tied_names = [name for g in tied for name in groups[g]]
        row_of = {name: i for i, name in enumerate(tied_names)}
        local = torch.full((len(tied_names), 2), -1, dtype=torch.int64)
        local[:, 1] = 0
        for g in tied:
            t = thresholds[g].key_threshold
            for seg in local_of[g]:
                count = 0
                if seg.numel:
                    count = selectors[seg.name].tie_count(t)
                local[row_of[seg.name]] = torch.tensor([seg.offset, count])
        gathered = torch.stack(comm.all_gather(local))  # [world, tied tensors, (offset, count)]
        stats.tie_gathers += 1
        for g in tied:
            rows = torch.tensor([row_of[name] for name in groups[g]])
            part = gathered[:, rows]  # [world, tensors of the group, 2]
            base = torch.tensor([starts[index[name]] for name in groups[g]])
            present = part[..., 0] >= 0
            position = torch.where(present, base[None, :] + part[..., 0], -1)
            count = torch.where(present, part[..., 1], 0)
            for seg in local_of[g]:
                mine = starts[index[seg.name]] + seg.offset
                before = int(count[present & (position < mine)].sum())
                mine_count = int(local[row_of[seg.name], 1])
                ties_of[seg.name] = max(0, min(thresholds[g].ties - before, mine_count))

    clock.lap("ties")
    parts = {}
    group_of = {name: g for g, group in enumerate(groups) for name in group}
    for seg in segments:
        threshold = thresholds[group_of[seg.name]]
        packed = selectors[seg.name].write_masks(Threshold(threshold.key_threshold, ties_of[seg.name]))
        parts[seg.name] = MaskPart(seg.offset, seg.numel, packed[seg.name], seg.local_shape)
        stats.local_histogram_passes += selectors[seg.name].stats.histogram_passes
    clock.lap("masks")

    metadata = {"method": method, "ratio": repr(ratio), "scope": scope}
    if entry.needs_seed:
        metadata["seed"] = str(seed)
    if entry.needs_gamma:
        metadata["gamma"] = repr(float(gamma))
    mask = ShardedMask(shapes, parts, metadata, rank=comm.rank, world_size=comm.world_size)
    stats.comm = getattr(comm, "stats", stats.comm)
    return (mask, stats) if return_stats else mask
