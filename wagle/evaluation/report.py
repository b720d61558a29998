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


def text_table(rows: list[list[str]], left: int = 1) -> str:
    """Rows of cells (the first is the header) as aligned plain text: the first ``left`` columns
    left-aligned, the others right-aligned, a dashed rule under the header, no trailing spaces."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(rows[0]), "  ".join("-" * w for w in widths), *(line(r) for r in rows[1:])])


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
    return text_table([header, *rows])


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


PRIVACY_COLUMNS = (
    ("ES", "extraction_strength"),
    ("EM", "exact_memorization"),
    ("AUC loss", "loss"),
    ("AUC zlib", "zlib"),
    ("AUC min-k", "min_k"),
    ("AUC min-k++", "min_k++"),
    ("AUC ref", "reference"),
    ("AUC gradnorm", "gradnorm"),
    ("privleak", "privleak"),
)


def format_privacy_table(results: Mapping[str, EvaluationResult]) -> str:
    """A plain-text table of the memorisation and MIA metrics, one row per run that has them:
    extraction strength and exact memorisation of the forget split, the MIA AUC of every attack
    (forget vs holdout; 0.5 = indistinguishable) and privleak (0 = the retain model's). Columns no
    run has are left out; "-" marks a value a run lacks. Empty string when no run has privacy metrics."""
    rows_in = {label: r.privacy for label, r in results.items() if r.privacy is not None}
    if not rows_in:
        return ""

    def value(privacy, key):
        if key in ("extraction_strength", "exact_memorization", "privleak"):
            return getattr(privacy, key)
        return privacy.auc.get(key)

    columns = [
        (title, key)
        for title, key in PRIVACY_COLUMNS
        if any(value(p, key) is not None for p in rows_in.values())
    ]
    header = ["run"] + [title for title, _ in columns]
    rows = [
        [str(label)] + [_fmt(value(p, key), 1 if key == "privleak" else 3) for _, key in columns]
        for label, p in rows_in.items()
    ]
    return text_table([header, *rows])


def roc_curve(forget_scores, holdout_scores) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates of the rule "holdout if score > t" over every threshold t
    (holdout = positive class, as the MIA AUC); the area under it is :func:`~wagle.evaluation.mia_auc`."""
    forget = np.asarray(forget_scores, dtype=np.float64)
    holdout = np.asarray(holdout_scores, dtype=np.float64)
    thresholds = np.unique(np.concatenate([forget, holdout]))[::-1]
    fpr = [0.0] + [float((forget >= t).mean()) for t in thresholds]
    tpr = [0.0] + [float((holdout >= t).mean()) for t in thresholds]
    return np.asarray(fpr), np.asarray(tpr)


def plot_privacy(
    results: Mapping[str, EvaluationResult],
    path: str | os.PathLike,
    *,
    attack: str = "min_k",
    title: str | None = None,
) -> None:
    """PNG with two panels: the ROC curves of the ``attack`` MIA (forget vs holdout) of every run
    that has privacy metrics, and the AUC of every attack per run as grouped bars (0.5 marked:
    indistinguishable, a retain model's value). Agg canvas; the file is written atomically."""
    rows = {label: r.privacy for label, r in results.items() if r.privacy is not None}
    if not rows:
        raise UserError("results: no run has privacy metrics (evaluate with a holdout set)")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.6), dpi=120)
    FigureCanvasAgg(fig)
    roc, bars = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for label, privacy in rows.items():
        if attack in privacy.forget_scores:
            fpr, tpr = roc_curve(privacy.forget_scores[attack], privacy.holdout_scores[attack])
            roc.plot(fpr, tpr, drawstyle="steps-post", label=f"{label} (AUC {privacy.auc[attack]:.2f})")
    roc.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    roc.set_xlabel("forget examples flagged 'unseen' (FPR)")
    roc.set_ylabel("holdout examples flagged 'unseen' (TPR)")
    roc.set_title(f"MIA ROC ({attack}): forget vs holdout")
    roc.legend(loc="lower right", fontsize=7)
    roc.grid(True, alpha=0.3)
    attacks = [key for _, key in PRIVACY_COLUMNS[2:-1] if any(key in p.auc for p in rows.values())]
    width = 0.8 / len(rows)
    for index, (label, privacy) in enumerate(rows.items()):
        xs = [a + index * width for a in range(len(attacks))]
        bars.bar(xs, [privacy.auc.get(key, np.nan) for key in attacks], width=width, label=label)
    bars.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    bars.set_xticks([a + 0.4 - width / 2 for a in range(len(attacks))], attacks)
    bars.set_ylim(0, 1.2)
    bars.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    bars.set_ylabel("MIA AUC (1 = forget set still looks seen)")
    bars.set_title(title or "Membership inference per attack")
    bars.legend(loc="upper center", fontsize=7, ncol=min(len(rows), 3))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
