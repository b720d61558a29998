"""``wagle.unlearn``: run an unlearning objective, updating only the weights a mask selects."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from wagle.data.batching import collate_examples, pad_id_of
from wagle.errors import UserError
from wagle.mask import WeightMask
from wagle.objectives import Objective, make_objective
from wagle.objectives.preference import REFUSAL_COLUMN, refusal_for
from wagle.positions import check_examples

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .examples import encode_examples, micro_batch_indices, ordered_batches

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class UnlearningDiverged(RuntimeError):
    """The loss became NaN/Inf; the run stopped before applying that step."""


@dataclass
class UnlearnResult:
    """What a run did: optimizer steps taken, per-step history, the last checkpoint, wall time."""

    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: str | None = None
    seconds: float = 0.0
    resumed_from: int | None = None


def _check_positive(name: str, value, *, integer: bool = False, allow_zero: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if (
        isinstance(value, bool)
        or not ok
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        kind = "an integer" if integer else "a number"
        raise UserError(f"{name}: must be {kind} {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def linear_schedule(warmup_steps: int, total_steps: int):
    """LR multiplier: linear warm-up over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = total_steps - step
        return max(0.0, remaining / max(1, total_steps - warmup_steps))

    return factor


def _with_refusals(dataset, seed: int) -> list[dict]:
    rows = [dict(r) for r in dataset]
    for index, row in enumerate(rows):
        if "question" not in row:
            raise UserError("forget: method 'po' needs a QA forget set (a 'question' column)")
        row[REFUSAL_COLUMN] = refusal_for(index, seed)
    return rows


def unlearn(
    model: torch.nn.Module,
    forget,
    retain=None,
    *,
    tokenizer,
    method: str | Objective = "npo",
    mask: WeightMask | None = None,
    steps: int = 100,
    lr: float = 1e-5,
    batch_size: int = 4,
    grad_accum: int = 1,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    max_grad_norm: float = 1.0,
    clip_mode: str = "mask_then_clip",
    max_length: int = 256,
    state_layout: str = "compact",
    precision: str | None = None,
    objective_kwargs: Mapping[str, Any] | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 0,
    resume: bool = True,
    seed: int = 0,
    state_dtype: torch.dtype = torch.float32,
    step_in_backward: bool = False,
    gradient_checkpointing: bool = False,
    progress: bool = True,
) -> UnlearnResult:
    """Unlearn ``forget`` from ``model`` while keeping ``retain``, in place.

    ``method`` is an objective name (``grad_ascent``, ``grad_diff``, ``npo``, ``simnpo``, ``po``,
    ``rmu``) or an :class:`~wagle.objectives.Objective`. With a ``mask`` only its selected weights
    change (parameters absent from the mask are frozen) and AdamW state exists only for them
    (``state_layout="compact"``); without one every weight is trained (dense AdamW).

    One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` forget (and retain) examples;
    gradients are clipped to global norm ``max_grad_norm`` (0 disables) before the step, over the selected
    gradient entries (``clip_mode="mask_then_clip"``) or, as the reference implementation does, over the
    full gradients of every masked tensor (``"clip_then_mask"``; see :mod:`wagle.optim.clipping`); the
    learning rate warms up linearly over ``warmup_ratio * steps`` steps and decays linearly to 0. Batches
    follow a seeded, resumable order. With ``checkpoint_dir``, a checkpoint (weights, optimizer, scheduler,
    objective state, step) is written atomically every ``checkpoint_every`` steps and at the end; with
    ``resume=True`` a run continues from the newest one. A NaN/Inf loss stops the run before that step
    is applied and raises :class:`UnlearningDiverged` naming the last good checkpoint.

    Memory options for large models: ``state_dtype=torch.bfloat16`` halves the moments;
    ``step_in_backward=True`` steps every parameter as soon as its gradient is complete and frees it
    (:class:`~wagle.optim.StepInBackward`), so no model-sized gradient buffer exists; clipping then
    applies ``max_grad_norm`` to each parameter's gradient on its own instead of the global norm;
    ``gradient_checkpointing=True`` recomputes each decoder layer's activations in backward (Hugging
    Face models), trading about one extra forward pass for most of the activation memory.
    """
    from wagle.models.checkpointing import activation_checkpointing  # late: imports transformers
    from wagle.optim import MaskedAdamW, StepInBackward  # late: the optimizer module imports the kernels
    from wagle.optim.clipping import check_clip_mode, clip_masked_grad_norm_

    _check_positive("steps", steps, integer=True)
    _check_positive("lr", lr)
    _check_positive("batch_size", batch_size, integer=True)
    _check_positive("grad_accum", grad_accum, integer=True)
    _check_positive("max_length", max_length, integer=True)
    _check_positive("weight_decay", weight_decay, allow_zero=True)
    _check_positive("max_grad_norm", max_grad_norm, allow_zero=True)
    _check_positive("checkpoint_every", checkpoint_every, integer=True, allow_zero=True)
    check_clip_mode(clip_mode)
    # clip_then_mask: fully unselected tensors keep gradients so that they enter the norm
    keep_unselected = clip_mode == "clip_then_mask" and max_grad_norm > 0
    if keep_unselected and step_in_backward:
        raise UserError("clip_mode: 'clip_then_mask' needs the global norm, not step_in_backward=True")
    if not 0.0 <= warmup_ratio < 1.0:
        raise UserError(f"warmup_ratio: must be in [0, 1), got {warmup_ratio!r}")
    if precision is not None and precision not in PRECISIONS:
        raise UserError(f"precision: expected one of {sorted(PRECISIONS)} or None, got {precision!r}")

    objective = (
        method if isinstance(method, Objective) else make_objective(method, **(objective_kwargs or {}))
    )
    if objective.uses_retain and retain is None and objective.name not in ("grad_ascent",):
        raise UserError(f"retain: method {objective.name!r} needs a retain set")
    if mask is not None:
        mask.check_compatible(model)
    if precision is not None:
        model.to(PRECISIONS[precision])

    pad_id = pad_id_of(tokenizer)
    forget_rows = _with_refusals(forget, seed) if objective.forget_answer_column == REFUSAL_COLUMN else forget
    forget_examples = encode_examples(
        forget_rows,
        tokenizer,
        role="forget",
        max_length=max_length,
        answer_column=objective.forget_answer_column,
    )
    retain_examples = (
        encode_examples(retain, tokenizer, role="retain", max_length=max_length)
        if retain is not None
        else None
    )
    check_examples(model, forget_examples, role="forget")
    check_examples(model, retain_examples, role="retain")
    device = next(model.parameters()).device

    def to_device(batch):
        return {k: v.to(device) for k, v in batch.items()}

    # parameters: with a mask only those with selected weights need gradients
    named = list(model.named_parameters())
    flags = {name: p.requires_grad for name, p in named}
    if mask is not None:
        trainable = [
            (n, p) for n, p in named if n in mask and (mask.selected(n) > 0 or keep_unselected) and flags[n]
        ]
        optimizer_mask = mask
        unmasked = "freeze"
    else:
        trainable = [(n, p) for n, p in named if flags[n]]
        optimizer_mask = WeightMask({})
        unmasked = "dense"
    if not any(mask is None or mask.selected(n) > 0 for n, _ in trainable):
        raise UserError("mask: selects no weight of a trainable parameter; nothing to unlearn")
    trainable_names = {n for n, _ in trainable}
    for name, param in named:
        param.requires_grad_(name in trainable_names)

    optimizer = MaskedAdamW(
        trainable,
        optimizer_mask,
        lr=lr,
        betas=betas,
        weight_decay=weight_decay,
        state_layout=state_layout if mask is not None else "dense",
        state_dtype=state_dtype,
        unmasked=unmasked,
    )
    warmup = int(warmup_ratio * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup, steps))

    start_step, resumed_from, history, last_checkpoint = 0, None, [], None
    existing = latest_checkpoint(checkpoint_dir) if resume else None
    if existing is not None:
        objective_state, trainer_state = load_checkpoint(existing, model, optimizer, scheduler)
        objective.load_state_dict(objective_state)
        start_step = resumed_from = int(trainer_state["step"])
        history = list(trainer_state.get("history", []))
        last_checkpoint = existing
        logger.info("resumed from %s (step %d)", existing, start_step)

    started = time.perf_counter()
    was_training = model.training
    hooks = None
    checkpointing = contextlib.ExitStack()
    try:
        if step_in_backward:
            hooks = StepInBackward(
                optimizer, accumulation_steps=grad_accum, clip_norm_per_param=max_grad_norm or None
            )
        objective.prepare(
            model,
            list(ordered_batches(forget_examples, batch_size, pad_id)),
            list(ordered_batches(retain_examples, batch_size, pad_id)) if retain_examples else None,
            progress=progress,
        )
        checkpointing.enter_context(activation_checkpointing(model, gradient_checkpointing))
        model.train()
        bar = tqdm(
            range(start_step, steps),
            desc=f"unlearn ({objective.name})",
            disable=not progress,
            initial=start_step,
            total=steps,
        )
        for step in bar:
            totals: dict[str, float] = {}
            step_loss = 0.0
            for micro in range(grad_accum):
                j = step * grad_accum + micro
                f_idx = micro_batch_indices(j, len(forget_examples), batch_size, seed)
                forget_batch = to_device(collate_examples([forget_examples[i] for i in f_idx], pad_id))
                retain_batch = None
                if retain_examples is not None:
                    r_idx = micro_batch_indices(j, len(retain_examples), batch_size, seed + 1)
                    retain_batch = to_device(collate_examples([retain_examples[i] for i in r_idx], pad_id))
                loss, stats = objective(model, forget_batch, retain_batch)
                if not torch.isfinite(loss):
                    optimizer.zero_grad(set_to_none=True)
                    where = (
                        f"the last good checkpoint is {last_checkpoint}"
                        if last_checkpoint
                        else "no checkpoint was saved"
                    )
                    raise UnlearningDiverged(
                        f"loss became {float(loss.detach())} at step {step} (micro-batch {micro}); "
                        f"stopped before applying it; {where}. Lower lr or check the data."
                    )
                (loss / grad_accum).backward()
                step_loss += float(loss.detach()) / grad_accum
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + value / grad_accum
            if not step_in_backward:  # otherwise the hooks clipped, stepped and freed during backward
                if max_grad_norm > 0:
                    grad_norm = float(clip_masked_grad_norm_(optimizer, max_grad_norm, clip_mode))
                    totals["grad_norm"] = grad_norm
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            record = {"step": step + 1, "loss": step_loss, "lr": scheduler.get_last_lr()[0], **totals}
            history.append(record)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            done = step + 1
            if checkpoint_dir and ((checkpoint_every and done % checkpoint_every == 0) or done == steps):
                last_checkpoint = save_checkpoint(
                    checkpoint_dir,
                    done,
                    model,
                    optimizer,
                    scheduler,
                    objective.state_dict(),
                    {"history": history, "method": objective.name, "seed": seed},
                )
    finally:
        if hooks is not None:
            hooks.remove()
        checkpointing.close()
        model.train(was_training)
        for name, param in named:
            param.requires_grad_(flags[name])
    return UnlearnResult(
        steps=steps,
        history=history,
        checkpoint=last_checkpoint,
        seconds=time.perf_counter() - started,
        resumed_from=resumed_from,
    )
