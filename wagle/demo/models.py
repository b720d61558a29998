"""The demo's tiny models: a tokenizer trained on the bundled author benchmark, the target model
(memorises every author) and the retain model (never saw the forget authors), the gold standard for
forget quality."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

from wagle.data.format import format_answer, format_question
from wagle.errors import UserError
from wagle.models.finetune import _check_number, _torch_threads, finetune
from wagle.models.tiny import make_tiny_llama, train_tokenizer
from wagle.synthetic.authors import RETAIN_OF, generate_benchmark

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)


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
