"""TOFU-style evaluation: answer probability, ROUGE-L, truth ratio, forget quality, model utility."""

from .evaluate import EvaluationResult, SplitMetrics, evaluate, evaluate_split
from .metrics import (
    answer_nll,
    answer_probability,
    forget_quality,
    greedy_answers,
    model_utility,
    rouge_l_recall,
    truth_ratio,
    truth_ratio_statistic,
    truth_ratios_from_nll,
)
from .report import format_table, plot_tradeoff, write_json

__all__ = [
    "EvaluationResult",
    "SplitMetrics",
    "answer_nll",
    "answer_probability",
    "evaluate",
    "evaluate_split",
    "forget_quality",
    "format_table",
    "greedy_answers",
    "model_utility",
    "plot_tradeoff",
    "rouge_l_recall",
    "truth_ratio",
    "truth_ratio_statistic",
    "truth_ratios_from_nll",
    "write_json",
]
