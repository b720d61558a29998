"""``wagle demo``: the whole pipeline on the bundled benchmark and a tiny Llama, in a few minutes on a CPU.

1. Build the tiny target model (fine-tuned on all authors + general QA) and the retain model (trained
   without the forget authors): the gold standard for forget quality.
2. Compute a WAGLE mask on the target model (forget and retain gradients), and a random mask with the
   same ratio.
3. Unlearn copies of the target with NPO: dense (all weights), with the WAGLE mask, with the random mask.
4. Evaluate everything against the retain model; write report.json and a trade-off plot. Each
   evaluation also measures memorisation and membership inference of the forget split against the
   benchmark's holdout authors (never trained on by any model); privacy.png shows them.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import asdict, dataclass

import torch

from wagle.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Settings of the demo run (the defaults are what README's table was measured with)."""

    forget_split: str = "forget10"
    ratio: float = 0.5
    method: str = "npo"
    steps: int = 40
    lr: float = 1e-3
    batch_size: int = 8
    grad_accum: int = 1
    beta: float = 0.1
    seed: int = 0
    eval_batch_size: int = 32
    max_new_tokens: int = 32
    eval_max_examples: int | None = 100  # first N examples of each split (the forget split is 50)
    quick_models: bool = False

    @classmethod
    def quick(cls) -> DemoConfig:
        """A tiny configuration for tests: few steps, small models."""
        return cls(steps=3, quick_models=True, max_new_tokens=8, eval_max_examples=10)


def run(
    config: DemoConfig, *, out_dir: str, device: torch.device | None = None, progress: bool = True
) -> dict:
    """Run the demo; returns the report dict (also written to ``out_dir/report.json``)."""
    from wagle.attribution import attribute
    from wagle.data import make_dataloader
    from wagle.evaluation import (
        evaluate,
        format_privacy_table,
        format_table,
        plot_privacy,
        plot_tradeoff,
        write_json,
    )
    from wagle.mask_plot import plot_mask_densities
    from wagle.synthetic.authors import HOLDOUT_OF, RETAIN_OF, generate_holdout
    from wagle.unlearning import unlearn

    from .models import TinyRecipe, build_demo_models

    if config.forget_split not in RETAIN_OF:
        raise UserError(f"forget_split: expected one of {sorted(RETAIN_OF)}, got {config.forget_split!r}")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(out_dir, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    built = build_demo_models(
        forget_split=config.forget_split,
        seed=config.seed,
        progress=progress,
        quick=config.quick_models,
        device=device,
    )
    tokenizer = built.tokenizer
    target, retain_model = built.target.to(device), built.retain.to(device)
    forget = built.benchmark[config.forget_split]
    retain = built.benchmark[RETAIN_OF[config.forget_split]]
    general = built.benchmark["general"]
    splits = {"forget": forget, "retain": retain, "general": general}
    num_authors = (TinyRecipe.quick() if config.quick_models else TinyRecipe()).num_authors
    holdout = generate_holdout(num_authors, config.seed)[HOLDOUT_OF[config.forget_split]]
    timings["models"] = time.perf_counter() - started

    eval_kw = {
        "batch_size": config.eval_batch_size,
        "max_new_tokens": config.max_new_tokens,
        "progress": progress,
        "holdout": holdout,
    }
    t = time.perf_counter()
    results = {"retain model": evaluate(retain_model, tokenizer, splits, reference=None, **eval_kw)}
    reference = results["retain model"]
    results["target"] = evaluate(target, tokenizer, splits, reference=reference, **eval_kw)
    timings["evaluate references"] = time.perf_counter() - t

    t = time.perf_counter()
    loader_kw = {"batch_size": config.batch_size, "max_length": 256}
    wagle_mask = attribute(
        target,
        make_dataloader(forget, tokenizer, **loader_kw),
        make_dataloader(retain, tokenizer, **loader_kw),
        ratio=config.ratio,
        method="wagle",
        progress=progress,
    )
    random_mask = attribute(
        target, None, ratio=config.ratio, method="random", seed=config.seed, progress=progress
    )
    wagle_mask.save(os.path.join(out_dir, "wagle_mask.safetensors"))
    timings["attribution"] = time.perf_counter() - t

    name = config.method.upper()
    runs = {name: None, f"{name}+WAGLE": wagle_mask, f"{name}+random": random_mask}
    histories = {}
    for label, mask in runs.items():
        t = time.perf_counter()
        model = copy.deepcopy(target)
        outcome = unlearn(
            model,
            forget,
            retain,
            tokenizer=tokenizer,
            method=config.method,
            mask=mask,
            steps=config.steps,
            lr=config.lr,
            batch_size=config.batch_size,
            grad_accum=config.grad_accum,
            seed=config.seed,
            objective_kwargs={"beta": config.beta} if config.method in ("npo", "simnpo") else None,
            progress=progress,
        )
        histories[label] = outcome.history
        results[label] = evaluate(model, tokenizer, splits, reference=reference, **eval_kw)
        timings[f"unlearn+eval {label}"] = time.perf_counter() - t
        del model
    timings["total"] = time.perf_counter() - started

    table = format_table(results)
    privacy_table = format_privacy_table(results)
    report = {
        "config": asdict(config),
        "device": str(device),
        "table": table,
        "privacy_table": privacy_table,
        "results": {label: r.to_dict() for label, r in results.items()},
        "mask": {
            "ratio": config.ratio,
            "selected": wagle_mask.num_selected,
            "numel": wagle_mask.numel,
            "per_parameter_density": wagle_mask.densities(),
        },
        "unlearning_history": histories,
        "timings_seconds": timings,
    }
    write_json(os.path.join(out_dir, "report.json"), report)
    plot_tradeoff(results, os.path.join(out_dir, "tradeoff.png"))
    plot_privacy(results, os.path.join(out_dir, "privacy.png"))
    plot_mask_densities(wagle_mask, os.path.join(out_dir, "mask_densities.png"))
    return report
