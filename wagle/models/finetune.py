"""Fine-tuning: make a tiny model memorise the bundled benchmark (target model) or only its retain
split (retain model, the gold standard for forget quality)."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from wagle.data.batching import make_dataloader
from wagle.data.benchmark import RETAIN_OF, generate_benchmark
from wagle.data.format import format_answer, format_question
from wagle.errors import UserError
from wagle.validation import check_number as _check_number

from .tiny import make_tiny_llama, train_tokenizer

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed torch for a block and restore the global RNG state afterwards."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _torch_threads(num_threads: int | None):
    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def finetune(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: datasets.Dataset | list[dict],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    max_length: int = 256,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.1,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "fine-tune",
) -> dict[str, float]:
    """Plain causal-LM fine-tuning: answer-only loss for QA rows (all tokens for text rows), AdamW,
    linear warm-up over ``warmup_ratio`` of the steps then linear decay to 0, gradient clipping.

    Deterministic in ``seed`` (batch order and any dropout; the global torch RNG is restored).
    Returns ``{"final_loss", "first_epoch_loss", "steps", "epochs", "examples", "seconds"}``, where
    the losses are means over the batches of the last and the first epoch. The model is left in
    eval mode.
    """
    _check_number("epochs", epochs, low=1, integer=True)
    _check_number("lr", lr, low=0.0, open_low=True)
    _check_number("batch_size", batch_size, low=1, integer=True)
    _check_number("max_length", max_length, low=2, integer=True)
    _check_number("weight_decay", weight_decay, low=0.0)
    _check_number("warmup_ratio", warmup_ratio, low=0.0)
    if warmup_ratio >= 1.0:
        raise UserError(f"warmup_ratio: must be in [0, 1), got {warmup_ratio!r}")
    if max_grad_norm is not None:
        _check_number("max_grad_norm", max_grad_norm, low=0.0, open_low=True)
    loader = make_dataloader(
        dataset, tokenizer, batch_size=batch_size, max_length=max_length, shuffle=True, seed=seed
    )
    total = epochs * len(loader)
    warmup = int(warmup_ratio * total)
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise UserError("model: has no trainable parameters")
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    device = parameters[0].device
    started = time.perf_counter()
    epoch_losses: list[float] = []
    model.train()
    try:
        with _seeded(seed, device), tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
            for _ in range(epochs):
                losses = []
                for batch in loader:
                    batch = {k: v.to(device) for k, v in batch.items() if k != "example_index"}
                    loss = model(**batch).loss
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"fine-tuning diverged (loss {float(loss)}); lower lr={lr}")
                    loss.backward()
                    if max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(float(loss.detach()))
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
                epoch_losses.append(sum(losses) / len(losses))
                logger.debug("%s: epoch %d mean loss %.4f", desc, len(epoch_losses), epoch_losses[-1])
    finally:
        model.eval()
    return {
        "final_loss": epoch_losses[-1],
        "first_epoch_loss": epoch_losses[0],
        "steps": total,
        "epochs": epochs,
        "examples": len(loader.dataset),
        "seconds": time.perf_counter() - started,
    }


@dataclass
class DemoModels:
    """The tokenizer, the target model (knows every author), the retain model (never saw the forget
    authors), the benchmark they were trained on and the fine-tuning statistics of each model."""

    tokenizer: PreTrainedTokenizerBase
    target: torch.nn.Module
    retain: torch.nn.Module
    benchmark: datasets.DatasetDict
    stats: dict[str, dict[str, float]]


@dataclass(frozen=True)
class TinyRecipe:
    """Model size and fine-tuning schedule of the demo models.

    The default makes the target model reproduce (nearly) every training answer under greedy decoding
    (ROUGE-L recall 1.0 on retain90 and general, 0.997 on forget10 on 2026-11-23) in about 20 s per
    model on 2 CPU cores.
    """

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 384
    vocab_size: int = 1024
    epochs: int = 20
    lr: float = 3e-3
    batch_size: int = 16
    warmup_ratio: float = 0.1
    num_authors: int = 100

    @classmethod
    def quick(cls) -> TinyRecipe:
        """Seconds, not memorisation: for tests of the pipeline."""
        return cls(
            hidden_size=32,
            num_layers=1,
            intermediate_size=64,
            vocab_size=400,
            epochs=1,
            num_authors=20,
        )


def _corpus(benchmark: datasets.DatasetDict) -> list[str]:
    """Tokenizer training text: every prompt+answer, paraphrase and perturbed answer."""
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
    num_threads: int | None = None,
) -> DemoModels:
    """Train the tokenizer on the bundled benchmark, then the target model (``full`` + ``general``)
    and the retain model (the retain split matching ``forget_split`` + ``general``) from the same
    random initialisation, on ``device`` (default CPU).

    ``quick`` uses :meth:`TinyRecipe.quick`; ``recipe`` overrides both. ``num_threads`` sets torch's
    intra-op threads for the fine-tunes only (restored afterwards); default: torch's own choice.
    """
    if forget_split not in RETAIN_OF:
        raise UserError(f"forget_split: expected one of {sorted(RETAIN_OF)}, got {forget_split!r}")
    if num_threads is not None:
        _check_number("num_threads", num_threads, low=1, integer=True)
    recipe = recipe or (TinyRecipe.quick() if quick else TinyRecipe())
    benchmark = generate_benchmark(num_authors=recipe.num_authors, seed=seed)
    tokenizer = train_tokenizer(_corpus(benchmark), vocab_size=recipe.vocab_size)
    stats = {}
    models = {}
    with _torch_threads(num_threads):
        for name, split in (("target", "full"), ("retain", RETAIN_OF[forget_split])):
            model = make_tiny_llama(
                tokenizer,
                hidden_size=recipe.hidden_size,
                num_layers=recipe.num_layers,
                num_heads=recipe.num_heads,
                intermediate_size=recipe.intermediate_size,
                seed=seed,
            )
            if device is not None:
                model.to(device)
            import datasets

            data = datasets.concatenate_datasets([benchmark[split], benchmark["general"]])
            stats[name] = finetune(
                model,
                tokenizer,
                data,
                epochs=recipe.epochs,
                lr=recipe.lr,
                batch_size=recipe.batch_size,
                warmup_ratio=recipe.warmup_ratio,
                seed=seed,
                progress=progress,
                desc=f"fine-tune {name}",
            )
            logger.info(
                "%s model: %d steps in %.1fs, loss %.3f -> %.3f",
                name,
                stats[name]["steps"],
                stats[name]["seconds"],
                stats[name]["first_epoch_loss"],
                stats[name]["final_loss"],
            )
            models[name] = model
    return DemoModels(tokenizer, models["target"], models["retain"], benchmark, stats)
