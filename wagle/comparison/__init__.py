"""Mask comparison studies: a grid of masks x ratios x learning rates x seeds, with dense and LoRA
baselines, compared by utility at matched forgetting (see :func:`compare`)."""

from .frontier import (
    MEASURES,
    Cell,
    LevelComparison,
    Stat,
    aggregate,
    best_at_level,
    compare_at_level,
    compare_stats,
    method_frontiers,
    pareto_front,
    summarize,
)
from .grid import BASELINES, MASK_METHODS, METHODS, Grid, RunSpec, trim_grid
from .results import ResultsFile
from .runner import CompareSettings, compare, forget_retain_gradients

__all__ = [
    "BASELINES",
    "MASK_METHODS",
    "MEASURES",
    "METHODS",
    "Cell",
    "CompareSettings",
    "Grid",
    "LevelComparison",
    "ResultsFile",
    "RunSpec",
    "Stat",
    "aggregate",
    "best_at_level",
    "compare",
    "compare_at_level",
    "compare_stats",
    "forget_retain_gradients",
    "method_frontiers",
    "pareto_front",
    "summarize",
    "trim_grid",
]
