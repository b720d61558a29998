"""Fine-tuning: make a tiny model memorise the bundled benchmark (target model) or only its retain
split (retain model, the gold standard for forget quality)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import datasets
import torch
from tqdm.auto import tqdm

from wagle.data.batching import make_dataloader
from wagle.data.benchmark import RETAIN_OF, generate_benchmark
from wagle.data.format import format_answer, format_question

from .tiny import make_tiny_llama, train_tokenizer

logger = logging.getLogger(__name__)


def finetune(
    model: torch.nn.Module,
    tokenizer,
    dataset,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    max_length: int = 256,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Plain causal-LM fine-tuning (answer-only loss for QA), AdamW, linear warm-up and decay.

    Returns ``{"final_loss", "steps", "seconds"}``.
    """
    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise ValueError(f"epochs, lr, batch_size: must be positive, got {epochs}, {lr}, {batch_size}")
    loader = make_dataloader(
        dataset, tokenizer, batch_size=batch_size, max_length=max_length, shuffle=True, seed=seed
    )
    total = epochs * len(loader)
    warmup = int(warmup_ratio * total)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    device = next(model.parameters()).device
    model.train()
    started, loss_value = time.perf_counter(), math.nan
    bar = tqdm(total=total, desc="fine-tune", disable=not progress, leave=False)
    for _ in range(epochs):
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items() if k != "example_index"}
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = float(loss.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
    bar.close()
    model.eval()
    return {"final_loss": loss_value, "steps": total, "seconds": time.perf_counter() - started}


@dataclass
class DemoModels:
    """The tokenizer, the target model (knows every author), the retain model (never saw the forget
    authors) and the benchmark they were trained on."""

    tokenizer: object
    target: torch.nn.Module
    retain: torch.nn.Module
    benchmark: datasets.DatasetDict
    stats: dict[str, dict[str, float]]


@dataclass(frozen=True)
class TinyRecipe:
    """Model size and fine-tuning schedule of the demo models."""

    hidden_size: int = 128
    num_layers: int = 2
    intermediate_size: int = 384
    vocab_size: int = 1024
    epochs: int = 20
    lr: float = 3e-3
    batch_size: int = 16
    num_authors: int = 100

    @classmethod
    def quick(cls) -> TinyRecipe:
        return cls(
            hidden_size=32, num_layers=1, intermediate_size=64, vocab_size=400, epochs=1, num_authors=20
        )


def _corpus(benchmark: datasets.DatasetDict) -> list[str]:
    texts = []
    for row in benchmark["full"].to_list() + benchmark["general"].to_list():
        texts.append(format_question(row["question"]) + format_answer(row["answer"]))
        texts.append(row["paraphrased_answer"])
        texts.extend(row["perturbed_answer"])
    return texts


def build_demo_models(
    *,
    forget_split: str = "forget10",
    seed: int = 0,
    progress: bool = True,
    quick: bool = False,
    recipe: TinyRecipe | None = None,
    device: torch.device | str | None = None,
) -> DemoModels:
    """Train the tokenizer, then the target model (``full`` + ``general``) and the retain model
    (the matching retain split + ``general``) from the same random initialisation, on ``device``."""
    if forget_split not in RETAIN_OF:
        raise ValueError(f"forget_split: expected one of {sorted(RETAIN_OF)}, got {forget_split!r}")
    recipe = recipe or (TinyRecipe.quick() if quick else TinyRecipe())
    benchmark = generate_benchmark(num_authors=recipe.num_authors, seed=seed)
    tokenizer = train_tokenizer(_corpus(benchmark), vocab_size=recipe.vocab_size)
    stats = {}
    models = {}
    for name, split in (("target", "full"), ("retain", RETAIN_OF[forget_split])):
        model = make_tiny_llama(
            tokenizer,
            hidden_size=recipe.hidden_size,
            num_layers=recipe.num_layers,
            intermediate_size=recipe.intermediate_size,
            seed=seed,
        )
        if device is not None:
            model.to(device)
        data = datasets.concatenate_datasets([benchmark[split], benchmark["general"]])
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            stats[name] = finetune(
                model,
                tokenizer,
                data,
                epochs=recipe.epochs,
                lr=recipe.lr,
                batch_size=recipe.batch_size,
                seed=seed,
                progress=progress,
            )
        finally:
            torch.random.set_rng_state(generator_state)
        logger.info("%s model: %s", name, stats[name])
        models[name] = model
    return DemoModels(tokenizer, models["target"], models["retain"], benchmark, stats)
