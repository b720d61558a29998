"""The demo's tiny models: a tokenizer trained on the bundled author benchmark, the target model
(memorises every author) and the retain model (never saw the forget authors), the gold standard for
forget quality."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

from wagle.errors import UserError
from wagle.models.finetune import _torch_threads
from wagle.models.tiny import TinyRecipe, qa_corpus, train_tokenizer
from wagle.synthetic.authors import RETAIN_OF, generate_benchmark
from wagle.validation import check_number

from .pool import PinnedPool

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


def _train(
    name: str,
    data: datasets.Dataset,
    recipe: TinyRecipe,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    device: torch.device | str | None,
    progress: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Fine-tune one demo model from its seeded initialisation: (CPU state dict, statistics)."""
    model = recipe.model(tokenizer, seed)
    if device is not None:
        model.to(device)
    stats = recipe.finetune(model, tokenizer, data, seed=seed, progress=progress, desc=f"fine-tune {name}")
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, stats


def build_demo_models(
    *,
    forget_split: str = "forget10",
    seed: int = 0,
    progress: bool = True,
    quick: bool = False,
    recipe: TinyRecipe | None = None,
    device: torch.device | str | None = None,
    num_threads: int | None = None,
    pool: PinnedPool | None = None,
) -> DemoModels:
    """Train the tokenizer on the bundled benchmark, then the target model (``full`` + ``general``)
    and the retain model (the retain split matching ``forget_split`` + ``general``) from the same
    random initialisation, on ``device`` (default CPU).

    ``quick`` uses :meth:`TinyRecipe.quick`; ``recipe`` overrides both. ``num_threads`` sets torch's
    intra-op threads for the fine-tunes only (restored afterwards); default: torch's own choice.
    ``pool`` (a :class:`~wagle.demo.pool.PinnedPool`) trains the two models as two of its tasks
    instead, on its pinned thread count (``num_threads`` is then not allowed).
    """
    import datasets

    if forget_split not in RETAIN_OF:
        raise UserError(f"forget_split: expected one of {sorted(RETAIN_OF)}, got {forget_split!r}")
    if num_threads is not None:
        check_number("num_threads", num_threads, low=1, integer=True)
        if pool is not None:
            raise UserError("num_threads: not with a pool (the pool pins its own thread count)")
    recipe = recipe or (TinyRecipe.quick() if quick else TinyRecipe())
    benchmark = generate_benchmark(num_authors=recipe.num_authors, seed=seed)
    tokenizer = train_tokenizer(qa_corpus(benchmark), vocab_size=recipe.vocab_size)
    names = (("target", "full"), ("retain", RETAIN_OF[forget_split]))
    tasks = [
        (
            name,
            datasets.concatenate_datasets([benchmark[split], benchmark["general"]]),
            recipe,
            tokenizer,
            seed,
            device,
            progress and pool is None,
        )
        for name, split in names
    ]
    if pool is None:
        with _torch_threads(num_threads):
            trained = [_train(*task) for task in tasks]
    else:
        trained = pool.map(_train, tasks)
    stats, models = {}, {}
    for (name, _), (state, stats[name]) in zip(names, trained, strict=True):
        model = recipe.model(tokenizer, seed)
        model.load_state_dict(state)
        model.eval()
        models[name] = model.to(device) if device is not None else model
        logger.info(
            "%s model: %d steps in %.1fs, loss %.3f -> %.3f",
            name,
            stats[name]["steps"],
            stats[name]["seconds"],
            stats[name]["first_epoch_loss"],
            stats[name]["final_loss"],
        )
    return DemoModels(tokenizer, models["target"], models["retain"], benchmark, stats)
