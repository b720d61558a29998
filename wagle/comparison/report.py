"""The comparison report: the table over seeds, frontiers, utility at matched forgetting, the plot."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from wagle.evaluation.report import text_table
from wagle.files import atomic_write, atomic_write_text

from .frontier import MEASURES, UTILITY, Cell, Stat, aggregate, compare_at_level, method_frontiers
from .grid import Grid

TABLE_METRICS = (
    ("utility", UTILITY),
    ("forget quality", "forget_quality"),
    ("forget ROUGE-L", "forget_rouge_l"),
    ("ROUGE gap", "rouge_gap"),
    ("forget prob", "forget_probability"),
    ("prob gap", "prob_gap"),
    ("retain ROUGE-L", "retain_rouge_l"),
)


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if value != 0 and abs(value) < 10**-digits:
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def format_stat(stat: Stat | None) -> str:
    """``mean+-std`` (``mean`` alone when n = 1, ``-`` when n = 0)."""
    if stat is None or stat.n == 0:
        return "-"
    if stat.n < 2:
        return _num(stat.mean)
    return f"{_num(stat.mean)}+-{_num(stat.std)}"


def format_cells(cells: Sequence[Cell], references: Mapping[str, Mapping] | None = None) -> str:
    """One row per (objective, method, ratio, lr, steps): n and mean+-std over seeds of each metric."""
    header = ["objective", "method", "ratio", "lr", "steps", "n", *(t for t, _ in TABLE_METRICS)]
    rows = [header]
    for label, ref in (references or {}).items():
        metrics = ref.get("metrics", {})
        rows.append(
            [
                "-",
                f"({label} model)",
                "-",
                "-",
                "-",
                "1",
                *(_num(metrics.get(key)) for _, key in TABLE_METRICS),
            ]
        )
    for cell in cells:
        n = max((s.n for s in cell.stats.values()), default=0)
        rows.append(
            [
                cell.objective,
                cell.method,
                "-" if cell.ratio is None else f"{cell.ratio:g}",
                f"{cell.lr:g}",
                str(cell.steps),
                str(n),
                *(format_stat(cell.stats.get(key)) for _, key in TABLE_METRICS),
            ]
        )
    return text_table(rows, left=2)


def format_matched(comparisons: Sequence) -> str:
    """Per objective, forgetting measure and level: each method's best utility (mean+-std, n) and who
    wins (the leader and every method tied with it within the seed spread)."""
    if not comparisons:
        return "(no comparisons)"
    methods: list[str] = []
    for comp in comparisons:
        for m in comp.best:
            if m not in methods:
                methods.append(m)
    rows = [["objective", "forgetting", *methods, "best (ties within seed spread)"]]
    for comp in comparisons:
        _, higher = MEASURES[comp.measure]
        cond = f"{comp.measure} {'>=' if higher else '<='} {comp.level:g}"
        cells = []
        for m in methods:
            cell = comp.best.get(m)
            if cell is None:
                cells.append("-")
            else:
                s = cell.stats[UTILITY]
                cells.append(f"{format_stat(s)} (n={s.n})")
        if comp.leader is None:
            verdict = "no method reaches it"
        else:
            others = [m for m in comp.winners if m != comp.leader]
            untested = [m for m in others if comp.verdicts[m] == "untested"]
            verdict = comp.leader + (f" = {', '.join(others)}" if others else " alone")
            if untested:
                verdict += f" (n<2: {', '.join(untested)})"
        rows.append([comp.objective, cond, *cells, verdict])
    return text_table(rows, left=2)


def _frontier_dict(fronts: Mapping[str, list[Cell]], measure: str) -> dict:
    return {
        method: [
            {
                "ratio": c.ratio,
                "lr": c.lr,
                "steps": c.steps,
                "utility": c.stats[UTILITY].to_dict(),
                measure: c.stats[measure].to_dict(),
            }
            for c in cells
        ]
        for method, cells in fronts.items()
    }


def build_report(
    study: Mapping[str, Any],
    fingerprint: str,
    references: Mapping[str, Mapping],
    records: Sequence[Mapping],
    *,
    grid: Grid,
    missing: Sequence[str] = (),
    budget: Mapping | None = None,
    fq_levels: Sequence[float] = (),
    gap_levels: Sequence[float] = (),
    timings: Mapping[str, float] | None = None,
    results_path: str | None = None,
) -> dict:
    """The report dict (what ``report.json`` holds) from the finished run records."""
    ok = [r for r in records if r.get("status") == "ok"]
    cells = aggregate(ok)
    frontiers: dict[str, dict] = {}
    comparisons = []
    for objective in grid.objectives:
        frontiers[objective] = {}
        for measure in MEASURES:
            frontiers[objective][measure] = _frontier_dict(
                method_frontiers(cells, objective, measure), measure
            )
            levels = fq_levels if measure == "forget_quality" else gap_levels
            comparisons.extend(compare_at_level(cells, objective, measure, level) for level in levels)
    refs = {
        label: {"metrics": ref.get("metrics", {})} for label, ref in references.items() if label != "gold"
    }
    refs = {"gold": {"metrics": references["gold"]["metrics"]}, **refs} if "gold" in references else refs
    return {
        "format": 1,
        "fingerprint": fingerprint,
        "study": dict(study),
        "results_file": results_path,
        "references": refs,
        "runs": {
            "finished": len(ok),
            "diverged": [r["key"] for r in records if r.get("status") != "ok"],
            "missing": list(missing),
        },
        "cells": [c.to_dict() for c in cells],
        "frontiers": frontiers,
        "matched": [c.to_dict() for c in comparisons],
        "budget": dict(budget) if budget is not None else None,
        "timings_seconds": dict(timings or {}),
        "table": format_cells(cells, refs),
        "matched_table": format_matched(comparisons),
        "_cells": cells,  # objects for the plot; dropped before writing
    }


def plot_frontiers(report: Mapping, path: str | os.PathLike) -> None:
    """PNG, one row per objective and one column per forgetting measure: every cell (mean, error bars =
    seed std) and each method's Pareto frontier as a line; the target model as a black cross. Written
    atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells: list[Cell] = report["_cells"]
    objectives = list(report["frontiers"]) or ["-"]
    measures = list(MEASURES)
    fig = Figure(figsize=(5.0 * len(measures), 4.2 * len(objectives)), dpi=100)
    FigureCanvasAgg(fig)
    methods = list(dict.fromkeys(c.method for c in cells))
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    target = report["references"].get("target", {}).get("metrics", {})
    for row, objective in enumerate(objectives):
        for col, measure in enumerate(measures):
            ax = fig.add_subplot(len(objectives), len(measures), row * len(measures) + col + 1)
            title, higher = MEASURES[measure]
            for method in methods:
                own = [c for c in cells if c.objective == objective and c.method == method]
                pts = [
                    (c.stats[measure], c.stats[UTILITY])
                    for c in own
                    if measure in c.stats and UTILITY in c.stats and c.stats[measure].n and c.stats[UTILITY].n
                ]
                if not pts:
                    continue

                def err(s: Stat) -> float:
                    return s.std if math.isfinite(s.std) else 0.0

                ax.errorbar(
                    [x.mean for x, _ in pts],
                    [y.mean for _, y in pts],
                    xerr=[err(x) for x, _ in pts],
                    yerr=[err(y) for _, y in pts],
                    fmt="o",
                    ms=4,
                    alpha=0.45,
                    color=colours[method],
                    elinewidth=0.8,
                )
                front = report["frontiers"][objective][measure].get(method, [])
                xs = [p[measure]["mean"] for p in front]
                ys = [p["utility"]["mean"] for p in front]
                ax.plot(xs, ys, "-", marker="o", ms=5, color=colours[method], label=method)
            if target.get(measure) is not None and target.get(UTILITY) is not None:
                ax.plot([target[measure]], [target[UTILITY]], "kx", ms=8, label="target")
            if measure == "forget_quality":
                ax.set_xscale("log")
            ax.set_xlabel(title + ("  (higher is better)" if higher else "  (lower is better)"))
            ax.set_ylabel("model utility")
            ax.set_title(f"{objective}: utility vs {measure}")
            ax.grid(True, which="both", alpha=0.3)
            if methods:
                ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def write_outputs(report: dict, out_dir: str | os.PathLike, *, plot: bool = True) -> None:
    """``report.json``, ``table.txt`` (both tables) and, with ``plot``, ``frontier.png`` into ``out_dir``."""
    from wagle.evaluation import write_json

    if plot:
        plot_frontiers(report, os.path.join(out_dir, "frontier.png"))
    cells = report.pop("_cells", None)
    try:
        write_json(os.path.join(out_dir, "report.json"), report)
        text = report["table"] + "\n\nUtility at matched forgetting\n" + report["matched_table"] + "\n"
        atomic_write_text(os.path.join(out_dir, "table.txt"), text)
    finally:
        if cells is not None:
            report["_cells"] = cells
