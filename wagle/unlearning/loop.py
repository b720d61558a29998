"""``wagle.unlearn``: run an unlearning objective, updating only the weights a mask selects."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from wagle.data.batching import collate_examples, pad_id_of
from wagle.errors import UserError
from wagle.files import remove_stale_temporaries
from wagle.mask import WeightMask, masked_trainable
from wagle.objectives import Objective, make_objective
from wagle.positions import check_examples
from wagle.validation import check_number

from . import checkpoint as _checkpoints
from .examples import encode_examples, micro_batch_indices, ordered_batches
from .fingerprint import (
    ResumeMismatchError,
    compare,
    examples_digest,
    mask_digest,
    normalised,
    weights_digest,
)

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class UnlearningDiverged(RuntimeError):
    """The loss, a gradient or the weights became NaN/Inf; the run stopped before applying that step.

    ``checkpoint`` is the last good checkpoint (None when none was saved)."""

    def __init__(self, message: str, checkpoint: str | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint


@dataclass
class UnlearnResult:
    """What a run did: optimizer steps taken, per-step history, the last checkpoint, wall time.

    ``resumed_from`` is the step of the checkpoint the run continued from (None for a fresh run);
    ``damaged_checkpoints`` names newer checkpoints skipped because they failed verification."""

    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: str | None = None
    seconds: float = 0.0
    resumed_from: int | None = None
    damaged_checkpoints: list[str] = field(default_factory=list)


OptimizerFactory = Callable[..., torch.optim.Optimizer]


def linear_schedule(warmup_steps: int, total_steps: int):
    """LR multiplier: linear warm-up over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = total_steps - step
        return max(0.0, remaining / max(1, total_steps - warmup_steps))

    return factor


def micro_batch_seed(seed: int, micro_step: int) -> int:
    """The torch RNG seed of micro-batch ``micro_step``: the first 63 bits of
    ``sha256("wagle-unlearn:{seed}:{micro_step}")``, a function of (seed, micro-step) only."""
    digest = hashlib.sha256(f"wagle-unlearn:{seed}:{micro_step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _cuda_indices(model: torch.nn.Module) -> list[int]:
    indices = set()
    for param in model.parameters():
        if param.device.type == "cuda":
            indices.add(param.device.index if param.device.index is not None else torch.cuda.current_device())
    return sorted(indices)


def _seed_torch(value: int, cuda_indices: list[int]) -> None:
    torch.default_generator.manual_seed(value)
    for index in cuda_indices:
        torch.cuda.default_generators[index].manual_seed(value)


def _check_options(
    steps,
    lr,
    batch_size,
    grad_accum,
    max_length,
    weight_decay,
    max_grad_norm,
    checkpoint_every,
    warmup_ratio,
    precision,
    clip_mode,
    step_in_backward,
) -> None:
    check_number("steps", steps, low=0, integer=True, open_low=True)
    check_number("lr", lr, low=0, open_low=True)
    check_number("batch_size", batch_size, low=0, integer=True, open_low=True)
    check_number("grad_accum", grad_accum, low=0, integer=True, open_low=True)
    check_number("max_length", max_length, low=0, integer=True, open_low=True)
    check_number("weight_decay", weight_decay, low=0)
    check_number("max_grad_norm", max_grad_norm, low=0)
    check_number("checkpoint_every", checkpoint_every, low=0, integer=True)
    from wagle.optim.clipping import check_clip_mode

    check_clip_mode(clip_mode)
    if clip_mode == "clip_then_mask" and max_grad_norm > 0 and step_in_backward:
        raise UserError("clip_mode: 'clip_then_mask' needs the global norm, not step_in_backward=True")
    if not 0.0 <= warmup_ratio < 1.0:
        raise UserError(f"warmup_ratio: must be in [0, 1), got {warmup_ratio!r}")
    if precision is not None and precision not in PRECISIONS:
        raise UserError(f"precision: expected one of {sorted(PRECISIONS)} or None, got {precision!r}")


def _trainable(model: torch.nn.Module, mask: WeightMask | None, keep_unselected: bool):
    """(trainable named parameters, the optimizer's mask, how it treats unmasked parameters).

    With a mask only parameters with selected weights need gradients, unless ``keep_unselected``
    (``clip_mode="clip_then_mask"``: fully unselected tensors keep gradients so that they enter the norm)."""
    if mask is not None:
        trainable = masked_trainable(model.named_parameters(), mask, keep_unselected=keep_unselected)
        return trainable, mask, "freeze"
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise UserError("model: has no parameter with requires_grad=True; nothing to unlearn")
    return trainable, WeightMask({}), "dense"


def _default_optimizer(params, mask, *, lr, betas, weight_decay, state_layout, state_dtype, unmasked):
    from wagle.optim import MaskedAdamW  # late: the optimizer module imports the kernels

    return MaskedAdamW(
        params,
        mask,
        lr=lr,
        betas=betas,
        weight_decay=weight_decay,
        state_layout=state_layout,
        state_dtype=state_dtype,
        unmasked=unmasked,
    )


def _where(checkpoint: str | None) -> str:
    return f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved"


def _first_nonfinite(named_params) -> str | None:
    for name, param in named_params:
        if not bool(torch.isfinite(param.detach()).all()):
            return name
    return None


def _resume(checkpoint_dir, fingerprint, model, optimizer, scheduler, objective, steps, store=_checkpoints):
    """Continue from the newest good checkpoint of the same run: (start step, history, path, skipped).

    Refuses (:class:`ResumeMismatchError`) a checkpoint of a run with another fingerprint. ``store``
    has the checkpoint functions (:mod:`.checkpoint`, or the sharded ones of an FSDP2 run)."""
    path, state, problems = store.find_checkpoint(checkpoint_dir)
    if path is None:
        return 0, [], None, problems
    changes = compare(state.get("fingerprint"), fingerprint)
    if changes:
        raise ResumeMismatchError(checkpoint_dir, changes)
    objective_state, state = store.load_checkpoint(path, model, optimizer, scheduler, verified=True)
    objective.load_state_dict(objective_state)
    start = int(state["step"])
    logger.info("resumed from step %d of %d (%s)", start, steps, path)
    return start, list(state.get("history", [])), path, problems


@dataclass
class _Run:
    """One run's pieces, and the work of one optimizer step on them."""

    model: torch.nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: Any
    trainable: list[tuple[str, torch.nn.Parameter]]
    forget: list[dict]
    retain: list[dict] | None
    pad_id: int
    batch_size: int
    grad_accum: int
    max_grad_norm: float
    clip_mode: str
    seed: int
    step_in_backward: bool
    cuda_indices: list[int]
    last_checkpoint: str | None = None

    def diverged(self, what: str, step: int, extra: str = "") -> UnlearningDiverged:
        self.optimizer.zero_grad(set_to_none=True)
        return UnlearningDiverged(
            f"{what} at step {step}{extra}; {_where(self.last_checkpoint)}. Lower lr or check the data.",
            self.last_checkpoint,
        )

    def micro_batch(self, j: int):
        """Forget (and retain) batch of micro-step ``j``, on the model's device, torch RNG seeded."""
        device = next(self.model.parameters()).device
        _seed_torch(micro_batch_seed(self.seed, j), self.cuda_indices)

        def batch(examples, seed):
            indices = micro_batch_indices(j, len(examples), self.batch_size, seed)
            collated = collate_examples([examples[i] for i in indices], self.pad_id)
            return {k: v.to(device) for k, v in collated.items()}

        return batch(self.forget, self.seed), (
            batch(self.retain, self.seed + 1) if self.retain is not None else None
        )

    def step(self, step: int) -> dict[str, float]:
        """Optimizer step ``step`` (``grad_accum`` micro-batches, checks, clip, step, schedule)."""
        from wagle.optim import NonFiniteGradientError

        totals: dict[str, float] = {}
        step_loss = 0.0
        for micro in range(self.grad_accum):
            forget_batch, retain_batch = self.micro_batch(step * self.grad_accum + micro)
            loss, stats = self.objective(self.model, forget_batch, retain_batch)
            if not torch.isfinite(loss):
                raise self.diverged(
                    f"loss became {float(loss.detach())}",
                    step,
                    f" (micro-batch {micro}); stopped before applying it",
                )
            try:
                (loss / self.grad_accum).backward()
            except NonFiniteGradientError as exc:
                raise self.diverged(
                    f"the gradient of {exc.name} became NaN/Inf",
                    step,
                    " with a finite loss; stopped before stepping it (parameters stepped earlier in that "
                    "backward pass changed in memory)",
                ) from None
            step_loss += float(loss.detach()) / self.grad_accum
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value / self.grad_accum
        if not self.step_in_backward:  # otherwise the hooks checked, clipped, stepped and freed in backward
            self.apply_gradients(step, totals)
        self.scheduler.step()
        return {"step": step + 1, "loss": step_loss, "lr": self.scheduler.get_last_lr()[0], **totals}

    def apply_gradients(self, step: int, totals: dict[str, float]) -> None:
        """Check the gradient norm (clipping first, see :meth:`_grad_norm`), record it in ``totals``,
        step the optimizer and clear the gradients; a non-finite norm stops the run before the step."""
        grad_norm = self._grad_norm()
        if not math.isfinite(grad_norm):
            raise self.diverged(
                f"the gradient norm became {grad_norm}",
                step,
                " with a finite loss; stopped before applying it",
            )
        totals["grad_norm"] = grad_norm
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _grad_norm(self) -> float:
        """The global L2 gradient norm under ``clip_mode`` (:mod:`wagle.optim.clipping`); gradients are
        clipped to ``max_grad_norm`` when it is > 0. Without clipping: the norm over the entries the
        optimizer uses (the selected ones of masked parameters), gradients untouched."""
        from wagle.optim import MaskedOptimizer
        from wagle.optim.clipping import clip_masked_grad_norm_

        if self.max_grad_norm > 0:
            return float(clip_masked_grad_norm_(self.optimizer, self.max_grad_norm, self.clip_mode))
        norms = []
        if isinstance(self.optimizer, MaskedOptimizer):
            for param, plan in self.optimizer.named_plans():
                if param.grad is None or self.optimizer.skips(plan):
                    continue
                grad = param.grad.detach()
                if plan.masked and plan.selected != plan.numel:
                    grad = torch.masked_select(grad.reshape(-1), plan.selected_flat(grad.device))
                norms.append(torch.linalg.vector_norm(grad.float(), 2.0))
        else:
            for _, param in self.trainable:
                if param.grad is not None:
                    norms.append(torch.linalg.vector_norm(param.grad.detach().float(), 2.0))
        return float(torch.linalg.vector_norm(torch.stack(norms), 2.0)) if norms else 0.0

    def check_weights(self, step: int) -> None:
        bad = _first_nonfinite(self.trainable)
        if bad is not None:
            raise self.diverged(f"{bad} became NaN/Inf", step, " with a finite loss and gradient")


def _run_fingerprint(
    model, mask, objective, make_optimizer, forget, retain, pad_id, digest=weights_digest, **settings
) -> dict:
    """The run's fingerprint (see :mod:`wagle.unlearning.fingerprint`), JSON-normalised."""
    return normalised(
        {
            "model weights": digest(model),
            "mask": mask_digest(mask),
            "forget data": examples_digest(forget),
            "retain data": examples_digest(retain),
            "pad token id": pad_id,
            "method": objective.name,
            "method settings": objective.settings(),
            "optimizer": getattr(make_optimizer, "__qualname__", type(make_optimizer).__name__),
            **settings,
            "weight dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        }
    )


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
    state_layout: str = "auto",
    precision: str | None = None,
    objective_kwargs: Mapping[str, Any] | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 0,
    resume: bool = True,
    seed: int = 0,
    state_dtype: torch.dtype = torch.float32,
    step_in_backward: bool = False,
    gradient_checkpointing: bool = False,
    optimizer: OptimizerFactory | None = None,
    progress: bool = True,
    template=None,
) -> UnlearnResult:
    """Unlearn ``forget`` from ``model`` while keeping ``retain``, in place.

    ``method`` is an objective name (``grad_ascent``, ``grad_diff``, ``npo``, ``simnpo``, ``po``,
    ``rmu``) or an :class:`~wagle.objectives.Objective`. With a ``mask`` only its selected weights
    change (parameters absent from the mask are frozen) and AdamW state exists only for them
    (``state_layout="auto"``: per parameter compact, selected weights only, wherever that takes fewer
    bytes than dense, see :func:`wagle.optim.auto_layout`; or ``"compact"``/``"dense"``); without one
    every weight is trained (dense AdamW).
    ``optimizer`` replaces :class:`~wagle.optim.MaskedAdamW`: a callable taking
    ``(named_params, mask, *, lr, betas, weight_decay, state_layout, state_dtype, unmasked)``.

    One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` forget (and retain) examples;
    gradients are clipped to global norm ``max_grad_norm`` (0 disables) before the step, over the selected
    gradient entries (``clip_mode="mask_then_clip"``) or, as the reference implementation does, over the
    full gradients of every masked tensor (``"clip_then_mask"``; see :mod:`wagle.optim.clipping`); the
    learning rate warms up linearly over ``warmup_ratio * steps`` steps and decays linearly to 0. Batches
    follow a seeded, resumable order, and torch's CPU generator and the CUDA generators of the model's
    devices are seeded with :func:`micro_batch_seed` ``(seed, micro-step)`` before every micro-batch
    (dropout), inside ``torch.random.fork_rng``: the caller's torch RNG state is the same after the call.

    With ``checkpoint_dir``, a verified checkpoint (weights, optimizer, scheduler, objective state,
    step, and the run's fingerprint: digests of the starting weights, mask and encoded data, and every
    setting above) is written atomically every ``checkpoint_every`` steps and at the end. With
    ``resume=True`` a run continues from the newest good checkpoint (a damaged newer one is skipped)
    and refuses, with :class:`~wagle.unlearning.fingerprint.ResumeMismatchError`, one of a run with
    another fingerprint; ``resume=False`` deletes the folder's checkpoints and starts over.

    A NaN/Inf loss or gradient norm (or weights that became non-finite) stops the run before that
    step is applied and raises :class:`UnlearningDiverged` naming the last good checkpoint; no
    checkpoint is ever written with non-finite weights.

    Memory options for large models: ``state_dtype=torch.bfloat16`` halves the moments;
    ``step_in_backward=True`` steps every parameter as soon as its gradient is complete and frees it
    (:class:`~wagle.optim.StepInBackward`), so no model-sized gradient buffer exists; clipping then
    applies ``max_grad_norm`` to each parameter's gradient on its own instead of the global norm, and a
    non-finite gradient stops the run when its parameter is due (parameters already stepped in that
    backward pass keep their update in memory); ``gradient_checkpointing=True`` recomputes each decoder
    layer's activations in backward (Hugging Face models), trading about one extra forward pass for
    most of the activation memory. ``template`` is the prompt format of QA rows (see
    :func:`wagle.data.get_prompt_format`).
    """
    from wagle.distributed.attribution import distributed_kind, refuse_sharded
    from wagle.models.checkpointing import activation_checkpointing  # late: imports transformers
    from wagle.optim import StepInBackward

    # --- FSDP2: the micro-batches split over the ranks (wagle.distributed.unlearning); DDP refused ---
    kind = distributed_kind(model)
    if kind == "ddp":
        refuse_sharded(model, "wagle.unlearn")
    sharded = None
    if kind == "fsdp":
        from wagle.distributed import unlearning as sharded

        sharded.check_options(step_in_backward=step_in_backward, precision=precision, optimizer=optimizer)
        progress = progress and torch.distributed.get_rank() == 0
        mask = mask.gather() if hasattr(mask, "gather") else mask  # a ShardedMask: the full bits
    store = sharded.ShardedCheckpoints() if sharded else _checkpoints
    remove_stale = store.remove_stale_temporaries if sharded else remove_stale_temporaries
    # --- end FSDP2 ---
    _check_options(
        steps,
        lr,
        batch_size,
        grad_accum,
        max_length,
        weight_decay,
        max_grad_norm,
        checkpoint_every,
        warmup_ratio,
        precision,
        clip_mode,
        step_in_backward,
    )
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
    forget_examples = encode_examples(
        objective.forget_rows(forget, seed),
        tokenizer,
        role="forget",
        max_length=max_length,
        answer_column=objective.forget_answer_column,
        template=template,
    )
    retain_examples = (
        encode_examples(retain, tokenizer, role="retain", max_length=max_length, template=template)
        if retain is not None
        else None
    )
    check_examples(model, forget_examples, role="forget")
    check_examples(model, retain_examples, role="retain")

    named = list(model.named_parameters())
    flags = {name: p.requires_grad for name, p in named}
    keep_unselected = clip_mode == "clip_then_mask" and max_grad_norm > 0
    trainable, optimizer_mask, unmasked = _trainable(model, mask, keep_unselected)
    trainable_names = {n for n, _ in trainable}
    for name, param in named:
        param.requires_grad_(name in trainable_names)
    was_training = model.training
    hooks = None
    context = contextlib.ExitStack()
    try:
        make_optimizer = optimizer or _default_optimizer
        layout = state_layout if mask is not None else "dense"
        opt = make_optimizer(
            trainable,
            optimizer_mask,
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            state_layout=layout,
            state_dtype=state_dtype,
            unmasked=unmasked,
        )
        warmup = int(warmup_ratio * steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(warmup, steps))
        run = (sharded.ShardedRun if sharded else _Run)(
            model,
            objective,
            opt,
            scheduler,
            trainable,
            forget_examples,
            retain_examples,
            pad_id,
            batch_size,
            grad_accum,
            max_grad_norm,
            clip_mode,
            seed,
            step_in_backward,
            _cuda_indices(model),
        )

        start_step, history, problems, fingerprint = 0, [], [], None
        if checkpoint_dir:
            fingerprint = _run_fingerprint(
                model,
                mask,
                objective,
                make_optimizer,
                forget_examples,
                retain_examples,
                pad_id,
                **(
                    {"digest": sharded.weights_digest, "world size": torch.distributed.get_world_size()}
                    if sharded
                    else {}
                ),
                steps=steps,
                lr=lr,
                **{"warmup steps": warmup},
                batch_size=batch_size,
                grad_accum=grad_accum,
                weight_decay=weight_decay,
                betas=list(betas),
                max_grad_norm=max_grad_norm,
                clip_mode=clip_mode,
                max_length=max_length,
                seed=seed,
                precision=precision,
                state_layout=layout,
                state_dtype=str(state_dtype),
                step_in_backward=step_in_backward,
                gradient_checkpointing=gradient_checkpointing,
            )
            remove_stale(checkpoint_dir)
            if resume:
                start_step, history, run.last_checkpoint, problems = _resume(
                    checkpoint_dir, fingerprint, model, opt, scheduler, objective, steps, store
                )
            else:
                store.remove_checkpoints(checkpoint_dir)
        resumed_from = start_step if run.last_checkpoint is not None else None

        started = time.perf_counter()
        context.enter_context(torch.random.fork_rng(devices=run.cuda_indices))
        if step_in_backward:
            hooks = StepInBackward(
                opt, accumulation_steps=grad_accum, clip_norm_per_param=max_grad_norm or None
            )
        if sharded:  # summed gradients (divide factor 1), restored after the run
            from wagle.distributed.attribution import summed_fsdp_gradients

            context.enter_context(summed_fsdp_gradients(model))
        _seed_torch(micro_batch_seed(seed, -1), run.cuda_indices)
        prepare = objective.prepare
        if sharded:
            prepare = lambda *a, **k: sharded.prepare_objective(objective, *a, **k)  # noqa: E731
        prepare(
            model,
            list(ordered_batches(forget_examples, batch_size, pad_id)),
            list(ordered_batches(retain_examples, batch_size, pad_id)) if retain_examples else None,
            progress=progress,
        )
        context.enter_context(activation_checkpointing(model, gradient_checkpointing))
        model.train()
        bar = tqdm(
            range(start_step, steps),
            desc=f"unlearn ({objective.name})",
            disable=not progress,
            initial=start_step,
            total=steps,
        )
        for step in bar:
            record = run.step(step)
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            done = step + 1
            due = checkpoint_dir and ((checkpoint_every and done % checkpoint_every == 0) or done == steps)
            if due or done == steps:
                run.check_weights(step)
            if due:
                run.last_checkpoint = store.save_checkpoint(
                    checkpoint_dir,
                    done,
                    model,
                    opt,
                    scheduler,
                    objective.state_dict(),
                    {"history": history, "method": objective.name, "seed": seed, "fingerprint": fingerprint},
                )
    finally:
        if hooks is not None:
            hooks.remove()
        context.close()
        model.train(was_training)
        for name, param in named:
            param.requires_grad_(flags[name])
    return UnlearnResult(
        steps=steps,
        history=history,
        checkpoint=run.last_checkpoint,
        seconds=time.perf_counter() - started,
        resumed_from=resumed_from,
        damaged_checkpoints=problems,
    )
