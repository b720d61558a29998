"""Comparison tables, atomic JSON reports and the forget-quality / model-utility trade-off plot."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from wagle.errors import UserError
from wagle.files import atomic_write, atomic_write_text

from .evaluate import EvaluationResult

SPLIT_COLUMNS = (("ROUGE-L", "rouge_l"), ("prob", "probability"), ("TR", "truth_ratio_stat"))


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if value != 0 and abs(value) < 10**-digits:
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def format_table(results: Mapping[str, EvaluationResult]) -> str:
    """A plain-text comparison table, one row per run (e.g. target, retain, NPO, NPO+WAGLE).

    Columns: forget quality, model utility, then ROUGE-L recall, answer probability and truth-ratio
    statistic ("TR") of every split, forget split first, in order of appearance. "-" marks a missing
    value (e.g. forget quality of a run evaluated without a reference).
    """
    if not results:
        raise UserError("results: nothing to tabulate")
    split_names: list[str] = []
    for result in results.values():
        for name in [result.forget_split, *result.splits]:
            if name in result.splits and name not in split_names:
                split_names.append(name)
    header = ["run", "forget quality", "model utility"]
    header += [f"{name} {title}" for name in split_names for title, _ in SPLIT_COLUMNS]
    rows = []
    for label, result in results.items():
        row = [str(label), _fmt(result.forget_quality), _fmt(result.model_utility)]
        for name in split_names:
            metrics = result.splits.get(name)
            row += [_fmt(getattr(metrics, attr)) if metrics else "-" for _, attr in SPLIT_COLUMNS]
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def _json_safe(obj: Any) -> Any:
    """Plain JSON types: results via ``to_dict``, tensors/arrays to lists, inf/NaN to strings."""
    if isinstance(obj, EvaluationResult):
        return obj.to_dict()
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _json_safe(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _json_safe(obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj))
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as strict JSON (indent 2) atomically: temp file in the same folder, fsync,
    ``os.replace``. EvaluationResults, tensors and numpy values are converted; inf/NaN become strings."""
    atomic_write_text(path, json.dumps(_json_safe(obj), indent=2, allow_nan=False) + "\n")


def plot_tradeoff(
    results: Mapping[str, EvaluationResult], path: str | os.PathLike, *, title: str | None = None
) -> None:
    """PNG scatter of forget quality (log y axis) against model utility, one labelled point per run.

    Runs without a forget quality or a model utility are listed in a note instead of plotted; a
    forget quality of 0 is drawn at the bottom of the axis. Uses the Agg canvas directly (no display,
    no pyplot state); the file is written atomically.
    """
    if not results:
        raise UserError("results: nothing to plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = [
        (label, float(r.model_utility), float(r.forget_quality))
        for label, r in results.items()
        if r.forget_quality is not None
        and r.model_utility is not None
        and math.isfinite(r.forget_quality)
        and math.isfinite(r.model_utility)
    ]
    skipped = [label for label in results if label not in {p[0] for p in points}]
    positive = [q for _, _, q in points if q > 0]
    floor = min([*positive, 1.0]) / 10 if positive else 1e-3

    fig = Figure(figsize=(6.4, 4.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    markers = "os^DvP*Xh<>"
    for index, (label, utility, quality) in enumerate(points):
        shown = max(quality, floor)
        ax.scatter(utility, shown, s=70, marker=markers[index % len(markers)], alpha=0.85, label=label)
        ax.annotate(label, (utility, shown), xytext=(6, 4), textcoords="offset points", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor / 2, top=2.0)
    ax.set_xlabel("model utility (higher keeps more)")
    ax.set_ylabel("forget quality: KS p-value (higher = closer to retain model)")
    ax.set_title(title or "Unlearning trade-off")
    ax.grid(True, which="both", alpha=0.3)
    if points:
        ax.legend(loc="best", fontsize=8)
    if skipped:
        ax.text(
            0.01,
            0.01,
            "not plotted (no forget quality / utility): " + ", ".join(skipped),
            transform=ax.transAxes,
            fontsize=7,
            alpha=0.7,
        )
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
