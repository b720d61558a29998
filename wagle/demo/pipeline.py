"""``wagle demo``: the whole pipeline on the bundled benchmark and a tiny Llama, in a few minutes on a CPU.

1. Build the tiny target model (fine-tuned on all authors + general QA) and the retain model (trained
   without the forget authors): the gold standard for forget quality.
2. Compute a WAGLE mask on the target model (forget and retain gradients), and per seed a random mask
   with the same ratio.
3. Unlearn copies of the target with NPO - dense (all weights), with the WAGLE mask, with the random
   mask - at every learning rate of ``lrs`` and every seed of ``seeds`` (the seed orders the unlearning
   batches and draws the random mask).
4. Evaluate every run against the retain model. The table gives mean+-std over the seeds per method
   and learning rate, the frontier plot each method's Pareto front of utility vs forgetting
   (:mod:`wagle.comparison.report`). The runs at the first seed and ``lr`` are the headline runs:
   they also measure memorisation and membership inference of the forget split against the
   benchmark's holdout authors (never trained on by any model; privacy.png) and make tradeoff.png.

Every computation runs with torch pinned to ``num_threads`` intra-op threads (BLAS sums in a
thread-count-dependent order), and the independent ones (the two fine-tunes, the unlearning runs) in
a pool of spawned processes (:class:`~wagle.demo.pool.PinnedPool`): the report is the same on any
machine thread count and any number of workers. On CUDA everything runs in this process.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass

import torch

from wagle.errors import UserError
from wagle.host import host_description

from .pool import PinnedPool, cpu_seconds, default_workers

logger = logging.getLogger(__name__)

METHODS = ("dense", "wagle", "random")  # wagle.comparison's names; labels: NPO, NPO+WAGLE, NPO+random


@dataclass
class DemoConfig:
    """Settings of the demo run (the defaults are what README's table was measured with).

    ``seed`` makes the benchmark and the models; ``seeds`` are the unlearning seeds; ``lr`` (one of
    ``lrs``) is the headline runs' learning rate. ``num_threads``: torch intra-op threads of every
    computation; ``workers``: processes for the independent ones (default ``min(os.cpu_count(),
    runs)``; 1 = in this process)."""

    forget_split: str = "forget10"
    ratio: float = 0.5
    method: str = "npo"
    steps: int = 40
    lr: float = 1e-3
    lrs: tuple[float, ...] = (5e-4, 1e-3, 2e-3)
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 8
    grad_accum: int = 1
    beta: float = 0.1
    seed: int = 0
    eval_batch_size: int = 32
    max_new_tokens: int = 32
    eval_max_examples: int | None = 100  # first N retain and general rows evaluated
    quick_models: bool = False
    num_threads: int = 1
    workers: int | None = None

    @classmethod
    def quick(cls) -> DemoConfig:
        """A tiny configuration for tests: few steps, small models, two seeds and learning rates."""
        return cls(
            steps=3,
            quick_models=True,
            max_new_tokens=8,
            eval_max_examples=10,
            lrs=(1e-3, 3e-3),
            seeds=(0, 1),
        )


@dataclass(frozen=True)
class _Models:
    """What a task needs to rebuild the demo's models in any process: recipe, tokenizer, weights."""

    recipe: object
    tokenizer: object
    seed: int
    device: str
    states: dict

    def get(self, name: str) -> torch.nn.Module:
        model = self.recipe.model(self.tokenizer, self.seed)
        model.load_state_dict(self.states[name])
        return model.to(self.device).eval()


def _evaluate(models: _Models, name: str, splits: dict, reference, eval_kw: dict):
    from wagle.evaluation import evaluate

    return evaluate(models.get(name), models.tokenizer, splits, reference=reference, **eval_kw)


def _wagle_mask(models: _Models, forget: list, retain: list, config: DemoConfig):
    from wagle.attribution import attribute
    from wagle.data import make_dataloader

    loader_kw = {"batch_size": config.batch_size, "max_length": 256}
    return attribute(
        models.get("target"),
        make_dataloader(forget, models.tokenizer, **loader_kw),
        make_dataloader(retain, models.tokenizer, **loader_kw),
        ratio=config.ratio,
        method="wagle",
        progress=False,
    )


def _unlearn_and_evaluate(
    models: _Models,
    spec,
    mask,
    retain: list,
    splits: dict,
    reference,
    config: DemoConfig,
    eval_kw: dict,
    headline: bool,
) -> dict:
    """One unlearning run (``splits["forget"]`` and ``retain``) on a fresh copy of the target, evaluated
    on ``splits`` (privacy metrics only for a headline run): its record for
    :func:`wagle.comparison.report.build_report` (with the history and, for a headline run, the
    EvaluationResult)."""
    from wagle.comparison.runner import run_metrics
    from wagle.evaluation import evaluate
    from wagle.objectives import objective_options
    from wagle.unlearning import UnlearningDiverged, unlearn

    t = time.perf_counter()
    model = models.get("target")
    record = {"kind": "run", "key": spec.key, **spec.to_dict(), "history": [], "result": None}
    try:
        outcome = unlearn(
            model,
            splits["forget"],
            retain,
            tokenizer=models.tokenizer,
            method=spec.objective,
            mask=mask,
            steps=spec.steps,
            lr=spec.lr,
            batch_size=config.batch_size,
            grad_accum=config.grad_accum,
            seed=spec.seed,
            objective_kwargs={"beta": config.beta} if "beta" in objective_options(spec.objective) else None,
            progress=False,
        )
    except UnlearningDiverged as exc:
        record.update(status="diverged", error=str(exc), metrics={})
    else:
        kw = eval_kw if headline else {**eval_kw, "holdout": None}
        result = evaluate(model, models.tokenizer, splits, reference=reference, **kw)
        gold = reference.splits["forget"]
        record.update(
            status="ok",
            metrics=run_metrics(result, {"rouge_l": gold.rouge_l, "probability": gold.probability}),
        )
        record["history"] = outcome.history
        record["result"] = result if headline else None
    record["seconds"] = time.perf_counter() - t
    return record


def run(
    config: DemoConfig, *, out_dir: str, device: torch.device | None = None, progress: bool = True
) -> dict:
    """Run the demo; returns the report dict (also written to ``out_dir/report.json``)."""
    from tqdm.auto import tqdm

    from wagle.attribution import attribute
    from wagle.comparison.grid import Grid
    from wagle.comparison.report import build_report, plot_frontiers
    from wagle.comparison.results import fingerprint
    from wagle.comparison.runner import DEFAULT_FQ_LEVELS, DEFAULT_GAP_LEVELS, run_metrics
    from wagle.evaluation import format_privacy_table, format_table, plot_privacy, plot_tradeoff, write_json
    from wagle.mask_plot import plot_mask_densities
    from wagle.models.finetune import _torch_threads
    from wagle.synthetic.authors import HOLDOUT_OF, RETAIN_OF, generate_holdout
    from wagle.validation import check_number

    from .models import TinyRecipe, build_demo_models

    if config.forget_split not in RETAIN_OF:
        raise UserError(f"forget_split: expected one of {sorted(RETAIN_OF)}, got {config.forget_split!r}")
    check_number("num_threads", config.num_threads, low=1, integer=True)
    if config.workers is not None:
        check_number("workers", config.workers, low=1, integer=True)
    grid = Grid.make(
        objectives=(config.method,),
        methods=METHODS,
        ratios=(config.ratio,),
        lrs=config.lrs,
        steps=(config.steps,),
        seeds=config.seeds,
    )
    if float(config.lr) not in grid.lrs:
        raise UserError(f"lr: must be one of lrs {list(grid.lrs)}, got {config.lr!r}")
    specs = grid.runs()
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workers = 1 if device.type == "cuda" else config.workers or default_workers(len(specs))
    os.makedirs(out_dir, exist_ok=True)
    timings: dict[str, float] = {}
    started, cpu_started = time.perf_counter(), cpu_seconds()
    recipe = TinyRecipe.quick() if config.quick_models else TinyRecipe()
    name = config.method.upper()
    labels = {"dense": name, "wagle": f"{name}+WAGLE", "random": f"{name}+random"}

    with _torch_threads(config.num_threads), PinnedPool(workers, config.num_threads) as pool:
        built = build_demo_models(
            forget_split=config.forget_split,
            seed=config.seed,
            progress=progress,
            recipe=recipe,
            device=device,
            pool=pool,
        )
        target = built.target
        models = _Models(
            recipe,
            built.tokenizer,
            config.seed,
            str(device),
            {"target": target.state_dict(), "retain": built.retain.state_dict()},
        )
        # unlearning: the whole forget and retain splits; evaluation: the whole forget split (forget
        # quality needs every truth ratio) and holdout, the first eval_max_examples retain/general rows
        limit = config.eval_max_examples
        forget_rows = built.benchmark[config.forget_split].to_list()
        unlearn_retain = built.benchmark[RETAIN_OF[config.forget_split]].to_list()
        splits = {
            "forget": forget_rows,
            "retain": unlearn_retain[:limit],
            "general": built.benchmark["general"].to_list()[:limit],
        }
        holdout = generate_holdout(recipe.num_authors, config.seed)[HOLDOUT_OF[config.forget_split]]
        timings["models"] = time.perf_counter() - started

        t = time.perf_counter()
        eval_kw = {
            "batch_size": config.eval_batch_size,
            "max_new_tokens": config.max_new_tokens,
            "progress": False,
            "holdout": holdout,
        }
        retain_result, wagle_mask = pool.run(
            [
                (_evaluate, (models, "retain", splits, None, eval_kw)),
                (_wagle_mask, (models, splits["forget"], unlearn_retain, config)),
            ]
        )
        masks = {("wagle", s): wagle_mask for s in config.seeds}
        for s in config.seeds:
            masks[("random", s)] = attribute(
                target, None, ratio=config.ratio, method="random", seed=s, progress=False
            )
        masks.update({("dense", s): None for s in config.seeds})
        timings["evaluate retain model, masks"] = time.perf_counter() - t

        t = time.perf_counter()
        headline_seed = grid.seeds[0]
        bar = tqdm(total=len(specs) + 1, desc="demo runs", unit="run", disable=not progress)
        try:
            target_result, *records = pool.run(
                [(_evaluate, (models, "target", splits, retain_result, eval_kw))]
                + [
                    (
                        _unlearn_and_evaluate,
                        (
                            models,
                            spec,
                            masks[(spec.method, spec.seed)],
                            unlearn_retain,
                            splits,
                            retain_result,
                            config,
                            eval_kw,
                            spec.seed == headline_seed and spec.lr == float(config.lr),
                        ),
                    )
                    for spec in specs
                ],
                on_done=lambda: bar.update(1),
            )
        finally:
            bar.close()
        timings["evaluate target, unlearn+evaluate runs"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started

    gold = retain_result.splits["forget"]
    gold_forget = {"rouge_l": gold.rouge_l, "probability": gold.probability}
    references = {
        "retain": {"metrics": run_metrics(retain_result, gold_forget)},
        "target": {"metrics": run_metrics(target_result, gold_forget)},
    }
    results = {"retain model": retain_result, "target": target_result}
    histories = {}
    for record in records:
        if record["result"] is not None:
            results[labels[record["method"]]] = record["result"]
            histories[labels[record["method"]]] = record["history"]
    runs = [{k: v for k, v in r.items() if k not in ("result", "history")} for r in records]
    study = {"demo": {k: v for k, v in asdict(config).items() if k != "workers"}}
    comparison = build_report(
        study,
        fingerprint(study),
        references,
        runs,
        grid=grid,
        fq_levels=DEFAULT_FQ_LEVELS,
        gap_levels=DEFAULT_GAP_LEVELS,
    )
    plot_frontiers(comparison, os.path.join(out_dir, "frontier.png"))
    report = {
        "config": asdict(config),
        "device": str(device),
        "host": host_description(device),
        "torch_threads": config.num_threads,
        "workers": workers,
        "table": comparison["table"],
        "matched_table": comparison["matched_table"],
        "headline_table": format_table(results),
        "privacy_table": format_privacy_table(results),
        "cells": comparison["cells"],
        "frontiers": comparison["frontiers"],
        "matched": comparison["matched"],
        "references": references,
        "runs": runs,
        "results": {label: r.to_dict() for label, r in results.items()},
        "mask": {
            "ratio": config.ratio,
            "selected": wagle_mask.num_selected,
            "numel": wagle_mask.numel,
            "per_parameter_density": wagle_mask.densities(),
        },
        "unlearning_history": histories,
        "model_stats": built.stats,
        "timings_seconds": timings,
        "cpu_seconds": cpu_seconds() - cpu_started,
    }
    write_json(os.path.join(out_dir, "report.json"), report)
    plot_tradeoff(results, os.path.join(out_dir, "tradeoff.png"))
    plot_privacy(results, os.path.join(out_dir, "privacy.png"))
    plot_mask_densities(wagle_mask, os.path.join(out_dir, "mask_densities.png"))
    return report
