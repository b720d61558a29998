"""The study grid: objectives x methods x ratios x learning rates x steps x seeds, and its budget trimming.

Mask methods (``wagle``, ``random``, ``magnitude``, ``gradient``, ``snip``, ``wanda``) run at every
ratio; ``dense`` (all weights) and ``lora`` (adapters only) have no ratio. Runs are ordered seed first
(every cell of seed 0, then of seed 1, ...), so an interrupted or trimmed study already holds a
complete single-seed picture before it adds spread.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

from wagle.errors import UserError

MASK_METHODS = ("wagle", "random", "magnitude", "gradient", "snip", "wanda")
BASELINES = ("dense", "lora")
METHODS = (*MASK_METHODS, *BASELINES)


@dataclass(frozen=True)
class RunSpec:
    """One unlearning run of the study."""

    objective: str
    method: str
    ratio: float | None
    lr: float
    steps: int
    seed: int

    @property
    def key(self) -> str:
        """Stable identifier in the results file."""
        ratio = "-" if self.ratio is None else repr(float(self.ratio))
        return f"{self.objective}|{self.method}|{ratio}|{float(self.lr)!r}|{self.steps}|{self.seed}"

    def to_dict(self) -> dict:
        return asdict(self)


def _numbers(name: str, values, *, low: float, high: float | None = None, integer: bool = False) -> tuple:
    if isinstance(values, (int, float, str)):
        values = (values,)
    values = tuple(values)
    if not values:
        raise UserError(f"{name}: needs at least one value")
    for v in values:
        kind = int if integer else (int, float)
        if isinstance(v, bool) or not isinstance(v, kind) or not math.isfinite(v) or v < low:
            raise UserError(
                f"{name}: every value must be {'an integer' if integer else 'a number'} >= {low}, got {v!r}"
            )
        if high is not None and v > high:
            raise UserError(f"{name}: every value must be <= {high}, got {v!r}")
    if len(set(values)) != len(values):
        raise UserError(f"{name}: duplicate values in {list(values)}")
    return tuple(int(v) for v in values) if integer else tuple(float(v) for v in values)


def _names(name: str, values, allowed: Sequence[str] | None) -> tuple[str, ...]:
    if isinstance(values, str):
        values = (values,)
    values = tuple(values)
    if not values:
        raise UserError(f"{name}: needs at least one value")
    if allowed is not None:
        unknown = [v for v in values if v not in allowed]
        if unknown:
            raise UserError(f"{name}: unknown {unknown}; expected some of {list(allowed)}")
    if len(set(values)) != len(values):
        raise UserError(f"{name}: duplicate values in {list(values)}")
    return values


@dataclass(frozen=True)
class Grid:
    """The axes of a study. ``lora_lrs`` (default: ``lrs``) are the learning rates of the LoRA baseline,
    which usually needs larger steps than full or masked fine-tuning; ``method_lrs`` (method, lrs)
    pairs give other methods their own learning rates (e.g. a random mask, which forgets less per
    step than a gradient-based one at the same lr), taking precedence over ``lrs`` and ``lora_lrs``."""

    objectives: tuple[str, ...]
    methods: tuple[str, ...]
    ratios: tuple[float, ...]
    lrs: tuple[float, ...]
    steps: tuple[int, ...]
    seeds: tuple[int, ...]
    lora_lrs: tuple[float, ...] | None = None
    method_lrs: tuple[tuple[str, tuple[float, ...]], ...] = ()

    @classmethod
    def make(
        cls,
        *,
        objectives: Sequence[str],
        methods: Sequence[str],
        ratios: Sequence[float] = (0.5,),
        lrs: Sequence[float],
        steps: Sequence[int],
        seeds: Sequence[int] = (0,),
        lora_lrs: Sequence[float] | None = None,
        method_lrs: Mapping[str, Sequence[float]] | None = None,
    ) -> Grid:
        """Validated grid (objective names are checked when runs are built; ``method_lrs`` entries of
        methods not in ``methods`` are dropped)."""
        from wagle.objectives import OBJECTIVES

        methods = _names("methods", methods, METHODS)
        own = dict(method_lrs or {})
        if own:
            _names("method_lrs", tuple(own), METHODS)
        has_masks = any(m in MASK_METHODS for m in methods)
        return cls(
            objectives=_names("objectives", objectives, tuple(OBJECTIVES)),
            methods=methods,
            ratios=_numbers("ratios", ratios, low=0.0, high=1.0) if has_masks else (),
            lrs=_numbers("lrs", lrs, low=0.0),
            steps=_numbers("steps", steps, low=1, integer=True),
            seeds=_numbers("seeds", seeds, low=0, integer=True),
            lora_lrs=None if lora_lrs is None else _numbers("lora_lrs", lora_lrs, low=0.0),
            method_lrs=tuple((m, _numbers(f"method_lrs[{m}]", own[m], low=0.0)) for m in methods if m in own),
        )

    def __post_init__(self):
        if any(r <= 0 for r in self.ratios):
            raise UserError(
                f"ratios: must be > 0 (a mask selecting nothing cannot unlearn), got {self.ratios}"
            )
        own = [lr for _, lrs in self.method_lrs for lr in lrs]
        if any(lr <= 0 for lr in (*self.lrs, *(self.lora_lrs or ()), *own)):
            raise UserError("lrs: learning rates must be > 0")

    def lrs_of(self, method: str) -> tuple[float, ...]:
        """The learning rates of ``method``'s runs."""
        own = dict(self.method_lrs)
        if method in own:
            return own[method]
        return self.lora_lrs if method == "lora" and self.lora_lrs is not None else self.lrs

    def runs(self) -> list[RunSpec]:
        """Every run, seed-major (seed, objective, method, ratio, lr, steps)."""
        out = []
        for seed in self.seeds:
            for objective in self.objectives:
                for method in self.methods:
                    ratios = self.ratios if method in MASK_METHODS else (None,)
                    for ratio in ratios:
                        for lr in self.lrs_of(method):
                            for steps in self.steps:
                                out.append(RunSpec(objective, method, ratio, lr, steps, seed))
        return out

    def to_dict(self) -> dict:
        out = {k: (list(v) if v is not None else None) for k, v in asdict(self).items() if k != "method_lrs"}
        if self.method_lrs:  # only when given: the fingerprint of a study without them is unchanged
            out["method_lrs"] = {m: list(lrs) for m, lrs in self.method_lrs}
        return out


def _thin(values: tuple, *, log: bool) -> tuple[tuple, object]:
    """Drop the interior value whose neighbours are closest (log spacing for learning rates); with two
    values left, drop the last. Returns (kept, dropped)."""
    if len(values) <= 2:
        return values[:-1], values[-1]
    order = sorted(values)
    pos = (lambda v: math.log(v)) if log else (lambda v: v)
    gaps = [pos(order[i + 1]) - pos(order[i - 1]) for i in range(1, len(order) - 1)]
    dropped = order[1 + gaps.index(min(gaps))]
    return tuple(v for v in values if v != dropped), dropped


_AXIS_NAMES = {
    "seeds": "seed",
    "ratios": "ratio",
    "lrs": "lr",
    "steps": "steps",
    "methods": "method",
    "objectives": "objective",
}


def trim_grid(grid: Grid, fits) -> tuple[Grid, list[str]]:
    """The largest grid, by a fixed order of cuts, for which ``fits(grid)`` is true, and what was cut.

    Cuts, each repeated while the grid does not fit: seeds down to 2 (the last first), ratios down to 2
    and learning rates down to 2 (interior values where they are densest), steps down to 1, seeds down
    to 1, ratios and learning rates down to 1, methods down to 1 (from the end of the list), objectives
    down to 1. If even the smallest grid does not fit it is returned with a note saying so.
    """
    dropped: list[str] = []

    def cut(g: Grid, axis: str, floor: int, *, log: bool = False, thin: bool = True) -> Grid:
        while not fits(g) and len(getattr(g, axis)) > floor:
            values = getattr(g, axis)
            if thin:
                kept, gone = _thin(values, log=log)
            else:
                kept, gone = values[:-1], values[-1]
            changes = {axis: kept}
            if axis == "lrs" and g.lora_lrs is not None and len(g.lora_lrs) > len(kept):
                lora_kept, lora_gone = _thin(g.lora_lrs, log=True)
                changes["lora_lrs"] = lora_kept
                dropped.append(f"lora lr {lora_gone:g}")
            if axis == "lrs" and any(len(lrs) > len(kept) for _, lrs in g.method_lrs):
                own = []
                for method, lrs in g.method_lrs:
                    if len(lrs) > len(kept):
                        lrs, gone_own = _thin(lrs, log=True)
                        dropped.append(f"{method} lr {gone_own:g}")
                    own.append((method, lrs))
                changes["method_lrs"] = tuple(own)
            g = replace(g, **changes)
            dropped.append(f"{_AXIS_NAMES[axis]} {gone if isinstance(gone, str) else format(gone, 'g')}")
        return g

    g = cut(grid, "seeds", 2, thin=False)
    if grid.ratios:
        g = cut(g, "ratios", 2)
    g = cut(g, "lrs", 2, log=True)
    g = cut(g, "steps", 1)
    g = cut(g, "seeds", 1, thin=False)
    if grid.ratios:
        g = cut(g, "ratios", 1)
    g = cut(g, "lrs", 1, log=True)
    g = cut(g, "methods", 1, thin=False)
    g = cut(g, "objectives", 1, thin=False)
    if not fits(g):
        dropped.append("(even the smallest grid does not fit the budget; it runs anyway)")
    return g, dropped
