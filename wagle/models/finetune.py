"""Fine-tuning: plain causal-LM training of a model on QA or text rows (the demo's and the study's
target and retain models are built with it)."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from wagle.data.batching import make_dataloader
from wagle.errors import UserError
from wagle.validation import check_number

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
    check_number("epochs", epochs, low=1, integer=True)
    check_number("lr", lr, low=0.0, open_low=True)
    check_number("batch_size", batch_size, low=1, integer=True)
    check_number("max_length", max_length, low=2, integer=True)
    check_number("weight_decay", weight_decay, low=0.0)
    check_number("warmup_ratio", warmup_ratio, low=0.0)
    if warmup_ratio >= 1.0:
        raise UserError(f"warmup_ratio: must be in [0, 1), got {warmup_ratio!r}")
    if max_grad_norm is not None:
        check_number("max_grad_norm", max_grad_norm, low=0.0, open_low=True)
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
