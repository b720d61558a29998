"""Comparison tables, JSON reports and the forget-quality / model-utility plot."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping

from .evaluate import EvaluationResult


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and 0 < abs(value) < 10**-digits:
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def format_table(results: Mapping[str, EvaluationResult]) -> str:
    """One row per run: forget quality, model utility, and per-split ROUGE-L / probability / truth ratio."""
    if not results:
        raise ValueError("results: nothing to tabulate")
    first = next(iter(results.values()))
    split_names = list(first.splits)
    header = ["run", "forget quality", "model utility"]
    for name in split_names:
        header += [f"{name} ROUGE-L", f"{name} prob", f"{name} TR"]
    rows = []
    for label, result in results.items():
        row = [label, _fmt(result.forget_quality), _fmt(result.model_utility)]
        for name in split_names:
            m = result.splits.get(name)
            row += [_fmt(m.rouge_l), _fmt(m.probability), _fmt(m.truth_ratio_stat)] if m else ["-"] * 3
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def _atomic_target(path: str) -> tuple[str, str]:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    return folder, tmp


def write_json(path: str, obj) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    _, tmp = _atomic_target(path)
    try:
        with open(tmp, "w") as handle:
            json.dump(obj, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def plot_tradeoff(results: Mapping[str, EvaluationResult], path: str) -> None:
    """PNG scatter of forget quality (log scale) against model utility, one labelled point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    markers = "os^DvP*X"
    for index, (label, result) in enumerate(results.items()):
        if result.forget_quality is None or result.model_utility is None:
            continue
        quality = max(result.forget_quality, 1e-30)
        marker = markers[index % len(markers)]
        ax.scatter(result.model_utility, quality, s=70, marker=marker, label=label, alpha=0.85)
    ax.legend(loc="best", fontsize=9)
    ax.set_yscale("log")
    ax.set_xlabel("model utility (higher keeps more)")
    ax.set_ylabel("forget quality, KS p-value (higher forgets better)")
    ax.set_title("Unlearning trade-off vs the retain model")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    _, tmp = _atomic_target(path)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
