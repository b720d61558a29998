"""Pure functions of finished runs: seed statistics, Pareto frontiers, utility at matched forgetting, ties.

A *cell* is one point of the grid without the seed: (objective, method, ratio, lr, steps). Its
statistics over seeds are ``mean``, the sample standard deviation ``std`` (ddof = 1; NaN when n < 2)
and ``n``.

Forgetting is measured three ways (:data:`MEASURES`):

* ``forget_quality``: the KS p-value against the gold (retain) model, higher is better;
* ``rouge_gap`` = |forget ROUGE-L - gold forget ROUGE-L| and ``prob_gap`` = |forget answer probability
  - gold forget answer probability|, lower is better: a model that forgets *more* than the gold model
  (lower ROUGE-L or probability than a model that never saw the data) is not unlearning better.

Utility at matched forgetting at a level L is, per method, the highest mean utility over that
method's cells whose mean forgetting meets L (forget quality >= L, or gap <= L): the method's Pareto
frontier read as a step function, without interpolating between runs that were never made.
Two methods tie when their mean utilities differ by no more than the seed spread of the difference,
``sqrt(std_a^2 + std_b^2)``; with fewer than two seeds on either side the spread is unknown and the
comparison is reported as ``untested``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

# measure -> (title, higher_is_better)
MEASURES: dict[str, tuple[str, bool]] = {
    "forget_quality": ("forget quality (KS p-value vs gold)", True),
    "rouge_gap": ("|forget ROUGE-L - gold|", False),
    "prob_gap": ("|forget prob - gold|", False),
}
UTILITY = "model_utility"
CELL_FIELDS = ("objective", "method", "ratio", "lr", "steps")


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (ddof=1, NaN for n < 2) and count of finite values."""

    mean: float
    std: float
    n: int

    def to_dict(self) -> dict[str, float | int | None]:
        def clean(v: float) -> float | None:
            return v if math.isfinite(v) else None

        return {"mean": clean(self.mean), "std": clean(self.std), "n": self.n}


def summarize(values: Iterable[float]) -> Stat:
    """Stat of the finite values (NaN/inf, e.g. of a diverged model, are left out of n)."""
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(kept)
    if n == 0:
        return Stat(math.nan, math.nan, 0)
    mean = sum(kept) / n
    if n < 2:
        return Stat(mean, math.nan, n)
    var = sum((v - mean) ** 2 for v in kept) / (n - 1)
    return Stat(mean, math.sqrt(var), n)


@dataclass
class Cell:
    """One grid point over seeds: its key fields and a Stat per metric."""

    objective: str
    method: str
    ratio: float | None
    lr: float
    steps: int
    stats: dict[str, Stat] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)

    @property
    def key(self) -> tuple:
        return (self.objective, self.method, self.ratio, self.lr, self.steps)

    @property
    def label(self) -> str:
        ratio = "" if self.ratio is None else f"@{self.ratio:g}"
        return f"{self.method}{ratio} lr={self.lr:g} steps={self.steps}"

    def to_dict(self) -> dict:
        return {
            "objective": self.objective,
            "method": self.method,
            "ratio": self.ratio,
            "lr": self.lr,
            "steps": self.steps,
            "seeds": list(self.seeds),
            "stats": {name: s.to_dict() for name, s in self.stats.items()},
        }


def aggregate(records: Iterable[Mapping]) -> list[Cell]:
    """Group run records (``objective, method, ratio, lr, steps, seed, metrics``) into cells, in
    order of first appearance; every metric of ``metrics`` gets a :class:`Stat` over the seeds."""
    cells: dict[tuple, Cell] = {}
    values: dict[tuple, dict[str, list[float]]] = {}
    for record in records:
        key = tuple(record[f] for f in CELL_FIELDS)
        if key not in cells:
            cells[key] = Cell(*key)
            values[key] = {}
        cells[key].seeds.append(int(record["seed"]))
        for name, value in record["metrics"].items():
            values[key].setdefault(name, []).append(math.nan if value is None else float(value))
    for key, cell in cells.items():
        cell.stats = {name: summarize(vals) for name, vals in values[key].items()}
    return list(cells.values())


def pareto_front(points: Sequence[tuple[float, float]], *, higher_x_is_better: bool) -> list[int]:
    """Indices of the non-dominated (forgetting x, utility y) points, sorted from best to worst x.

    Utility is always maximised; x is maximised when ``higher_x_is_better`` else minimised. A point
    is dominated when another is at least as good on both axes and strictly better on one; points
    with a non-finite coordinate are never on the front. Of identical points the first is kept."""
    sign = 1.0 if higher_x_is_better else -1.0
    finite = [i for i, (x, y) in enumerate(points) if math.isfinite(x) and math.isfinite(y)]
    # best x first; among equal x, best y first; then by index (stable)
    order = sorted(finite, key=lambda i: (-sign * points[i][0], -points[i][1], i))
    front, best_y = [], -math.inf
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def meets(value: float, level: float, higher_is_better: bool) -> bool:
    """True when a forgetting value is at least as good as ``level``."""
    if not math.isfinite(value):
        return False
    return value >= level if higher_is_better else value <= level


def best_at_level(cells: Sequence[Cell], measure: str, level: float) -> Cell | None:
    """The cell of highest mean utility whose mean ``measure`` meets ``level`` (None if no cell does).
    Ties in utility go to the earlier cell."""
    _, higher = MEASURES[measure]
    best = None
    for cell in cells:
        forgetting, utility = cell.stats.get(measure), cell.stats.get(UTILITY)
        if forgetting is None or utility is None or not math.isfinite(utility.mean):
            continue
        if meets(forgetting.mean, level, higher) and (
            best is None or utility.mean > best.stats[UTILITY].mean
        ):
            best = cell
    return best


def difference_spread(a: Stat, b: Stat) -> float:
    """Seed spread of the difference of two cells' utilities: sqrt(std_a^2 + std_b^2) (NaN if unknown)."""
    if a.n < 2 or b.n < 2:
        return math.nan
    return math.sqrt(a.std**2 + b.std**2)


def compare_stats(a: Stat, b: Stat) -> str:
    """``"better"``, ``"worse"``, ``"tie"`` (|mean_a - mean_b| <= spread) or ``"untested"`` (n < 2)."""
    spread = difference_spread(a, b)
    if not math.isfinite(spread):
        return "untested"
    diff = a.mean - b.mean
    if abs(diff) <= spread:
        return "tie"
    return "better" if diff > 0 else "worse"


@dataclass
class LevelComparison:
    """Utility at one matched forgetting level: each method's best cell, the leader, the verdicts."""

    objective: str
    measure: str
    level: float
    best: dict[str, Cell | None]
    leader: str | None
    verdicts: dict[str, str]  # method -> leader's verdict against it: better / tie / untested / "-"

    @property
    def winners(self) -> list[str]:
        """The leader and every method it does not beat by more than the spread (ties, untested)."""
        if self.leader is None:
            return []
        return [self.leader] + [m for m, v in self.verdicts.items() if v in ("tie", "untested")]

    def to_dict(self) -> dict:
        def cell_summary(cell: Cell | None):
            if cell is None:
                return None
            return {
                "ratio": cell.ratio,
                "lr": cell.lr,
                "steps": cell.steps,
                "utility": cell.stats[UTILITY].to_dict(),
                self.measure: cell.stats[self.measure].to_dict(),
            }

        return {
            "objective": self.objective,
            "measure": self.measure,
            "level": self.level,
            "leader": self.leader,
            "winners": self.winners,
            "verdicts": dict(self.verdicts),
            "best": {method: cell_summary(cell) for method, cell in self.best.items()},
        }


def compare_at_level(cells: Sequence[Cell], objective: str, measure: str, level: float) -> LevelComparison:
    """Per method of ``objective``, the best utility at matched forgetting ``level``; the leader (highest
    mean utility) and its verdict against every other method that reaches the level."""
    methods: list[str] = []
    for cell in cells:
        if cell.objective == objective and cell.method not in methods:
            methods.append(cell.method)
    best = {
        m: best_at_level([c for c in cells if c.objective == objective and c.method == m], measure, level)
        for m in methods
    }
    reached = {m: c for m, c in best.items() if c is not None}
    leader = max(reached, key=lambda m: reached[m].stats[UTILITY].mean, default=None)
    verdicts = {}
    for m in methods:
        if m == leader:
            continue
        if best[m] is None:
            verdicts[m] = "-"  # never reaches this level
        else:
            verdicts[m] = compare_stats(reached[leader].stats[UTILITY], best[m].stats[UTILITY])
    return LevelComparison(objective, measure, level, best, leader, verdicts)


def method_frontiers(cells: Sequence[Cell], objective: str, measure: str) -> dict[str, list[Cell]]:
    """Each method's Pareto frontier (utility vs ``measure``, cell means), best forgetting first."""
    _, higher = MEASURES[measure]
    fronts: dict[str, list[Cell]] = {}
    for cell in cells:
        if cell.objective == objective:
            fronts.setdefault(cell.method, [])
    for method in fronts:
        own = [c for c in cells if c.objective == objective and c.method == method]
        points = [
            (
                c.stats[measure].mean if measure in c.stats else math.nan,
                c.stats[UTILITY].mean if UTILITY in c.stats else math.nan,
            )
            for c in own
        ]
        fronts[method] = [own[i] for i in pareto_front(points, higher_x_is_better=higher)]
    return fronts
