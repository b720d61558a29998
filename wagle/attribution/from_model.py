"""Attribution from a model: accumulate g_f and g_r over data, then score and select weights.

As in the reference implementation, gradients are of the plain next-token NLL (the model's own loss
on batches with ``labels``; prompt tokens labelled -100), SUMMED over the batches of one pass. Memory:
the forget gradient is moved out of ``.grad`` before the retain pass, so at most one model-sized
gradient buffer exists beside ``.grad``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from wagle.errors import UserError
from wagle.mask import WeightMask, model_metadata, parameter_aliases
from wagle.positions import check_sequence_length
from wagle.validation import check_gamma, check_ratio
from wagle_kernels.scores import SCORE_METHODS, method_names

from .from_gradients import mask_from_gradients
from .wanda import wanda_mask

logger = logging.getLogger(__name__)


def attribution_methods() -> tuple[str, ...]:
    """Every method :func:`attribute` accepts: the registered score methods, then ``wanda``."""
    return (*method_names(), "wanda")


ATTRIBUTION_METHODS = attribution_methods()  # at import time; attribution_methods() sees later registrations
Batch = Mapping[str, torch.Tensor]


def select_parameters(
    model: torch.nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> dict[str, torch.nn.Parameter]:
    """Parameters whose names match any ``include`` glob (all when None) and no ``exclude`` glob.

    A tied parameter is listed once by ``named_parameters()`` (e.g. ``model.embed_tokens.weight``);
    its other names (``lm_head.weight``) match too and select or exclude that same parameter."""
    names_of: dict[str, list[str]] = {name: [name] for name, _ in model.named_parameters()}
    for alias, name in parameter_aliases(model).items():
        names_of[name].append(alias)

    def matches(patterns: Sequence[str], name: str) -> bool:
        return any(fnmatch.fnmatchcase(n, pattern) for n in names_of[name] for pattern in patterns)

    chosen = {}
    for name, param in model.named_parameters():
        if include and not matches(include, name):
            continue
        if exclude and matches(exclude, name):
            continue
        chosen[name] = param
        if include and len(names_of[name]) > 1 and not matches(include, name):
            logger.info("%s is tied to %s: selected under that name", names_of[name][1], name)
    if not chosen:
        raise UserError(f"include/exclude: no parameter matches (include={include}, exclude={exclude})")
    return chosen


MAX_LENGTH_OPTION = "max_length (CLI: --max-length)"


def _to_device(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError("batches must be mappings with 'input_ids' (and 'labels'), e.g. from make_dataloader")
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _checked(model: torch.nn.Module, batch: Batch, what: str) -> Batch:
    """``batch``, after checking it is a batch mapping whose length fits the model's positions."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError("batches must be mappings with 'input_ids' (and 'labels'), e.g. from make_dataloader")
    check_sequence_length(model, int(batch["input_ids"].shape[-1]), what=what, option=MAX_LENGTH_OPTION)
    return batch


@contextlib.contextmanager
def gradient_scope(model: torch.nn.Module, params: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Only ``params`` (by identity) require grad and every ``.grad`` starts empty; the
    ``requires_grad`` flags and existing gradients of all parameters are restored on exit."""
    saved = {name: p.grad for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    wanted = {id(p) for p in params.values()}
    try:
        for _, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(id(p) in wanted)
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
            p.grad = saved[name]


def _batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    labels = batch.get("labels", batch["input_ids"])
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    return model(**inputs, labels=labels).loss


def accumulate_gradients(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    params: Mapping[str, torch.nn.Parameter],
    *,
    max_batches: int | None = None,
    progress: bool = True,
    desc: str = "gradients",
) -> int:
    """Add d(NLL)/d(theta) of every batch into ``param.grad`` (summed over batches, as the reference
    implementation does). Returns the number of batches; raises if a loss is not finite."""
    device = next(iter(params.values())).device
    count = 0
    total = None if max_batches is None else max_batches
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    for batch in tqdm(batches, desc=desc, total=total, disable=not progress, leave=False):
        if max_batches is not None and count >= max_batches:
            break
        batch = _checked(model, batch, f"{desc}: batch {count}")
        loss = _batch_loss(model, _to_device(batch, device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {float(loss)} on batch {count}")
        loss.backward()
        count += 1
    if count == 0:
        raise UserError(f"{desc}: no batches (the data set is empty)")
    return count


def _take_grads(params: Mapping[str, torch.nn.Parameter], to_host: bool = False) -> dict[str, torch.Tensor]:
    """Move the accumulated gradients out of ``.grad`` (into host memory with ``to_host``)."""
    grads = {}
    for name, param in params.items():
        grad = param.grad
        if grad is None:  # a parameter that the loss does not reach has a zero gradient
            grad = torch.zeros_like(param)
        if to_host and grad.device.type != "cpu":
            host = torch.empty(
                grad.shape, dtype=grad.dtype, device="cpu", pin_memory=torch.cuda.is_available()
            )
            grad = host.copy_(grad)
        grads[name] = grad
        param.grad = None
    return grads


def _with_prompt_format(mask: WeightMask, forget) -> WeightMask:
    """Record the prompt format of the forget batches (a loader from ``make_dataloader``) in the mask."""
    fmt = getattr(forget, "prompt_format", None)
    if fmt is not None:
        mask.metadata.update(fmt.describe())
    return mask


def attribute(
    model: torch.nn.Module,
    forget: Iterable[Batch] | None,
    retain: Iterable[Batch] | None = None,
    *,
    ratio: float,
    method: str = "wagle",
    gamma: float = 1e-6,
    scope: str = "global",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    backend: str = "auto",
    seed: int | None = None,
    nonfinite: str = "error",
    max_batches: int | None = None,
    offload_gradients: bool = False,
    gradient_checkpointing: bool = False,
    progress: bool = True,
) -> WeightMask:
    """Compute a weight mask for ``model`` from forget/retain batches.

    On an FSDP2 model (``fully_shard``) it returns a :class:`~wagle.distributed.ShardedMask` (this
    rank's bits of the one-device mask); on a ``DistributedDataParallel`` model the full mask on every
    rank (see :mod:`wagle.distributed.attribution`). DeepSpeed models are refused.

    ``forget``/``retain`` are iterables of batches with ``input_ids``, ``attention_mask`` and
    ``labels`` (e.g. :func:`wagle.data.make_dataloader`). g_f and g_r are sums over the batches of the
    mean-token NLL gradient. Methods: ``wagle`` |(w - g_r/gamma) * g_f|, ``snip`` |w * g_f|,
    ``gradient`` |g_f| (SalUn-style), ``magnitude`` |w|, ``random``, and ``wanda`` (|W| * ||X_j||,
    per output row, Linear weights only; activations from the forget batches). Other options are as
    in :func:`wagle.mask_from_gradients`. Existing ``.grad`` values are left untouched.

    Memory: g_f is moved out of ``.grad`` before the retain pass, so weights + 2 gradient buffers are
    held. ``offload_gradients=True`` keeps g_f in (pinned) host memory instead and streams it to the
    device tensor by tensor during selection: device memory ~ weights + 1 gradient buffer.
    ``gradient_checkpointing=True`` recomputes each decoder layer's activations in backward (Hugging
    Face models; same gradients, about one extra forward pass) so long batches fit.
    The prompt format of the forget loader (``prompt_format``) is recorded in the mask's metadata.
    """
    if method not in attribution_methods():
        raise UserError(f"method: unknown method {method!r}; expected one of {list(attribution_methods())}")
    check_ratio(ratio)
    from wagle.distributed.attribution import attribute_distributed, distributed_kind

    kind = distributed_kind(model)
    if kind is not None:  # FSDP2 / DDP: wagle.distributed.attribution
        mask = attribute_distributed(
            model,
            forget,
            retain,
            include=include,
            exclude=exclude,
            method=method,
            max_batches=max_batches,
            offload_gradients=offload_gradients,
            gradient_checkpointing=gradient_checkpointing,
            ratio=ratio,
            gamma=gamma,
            scope=scope,
            backend=backend,
            seed=seed,
            nonfinite=nonfinite,
        )
        # the metadata of the one-device mask: DDP's wrapped module names, FSDP2's global shapes
        mask.metadata.update(model_metadata(model.module if kind == "ddp" else model))
        return _with_prompt_format(mask, forget)
    params = select_parameters(model, include, exclude)
    entry = SCORE_METHODS.get(method)  # None for wanda (activations, not a per-weight score)
    needs_forget = entry is None or entry.reads_forget
    needs_retain = entry is not None and entry.reads_retain
    if needs_forget and forget is None:
        raise UserError(f"forget: method={method!r} needs forget-set batches")
    if needs_retain and retain is None:
        raise UserError(f"retain: method={method!r} needs retain-set batches")
    if entry is not None and entry.needs_gamma:
        check_gamma(gamma, method)

    was_training = model.training
    model.eval()
    try:
        mask = _attribute(
            model,
            forget,
            retain,
            params,
            method=method,
            ratio=ratio,
            gamma=gamma,
            scope=scope,
            backend=backend,
            seed=seed,
            nonfinite=nonfinite,
            max_batches=max_batches,
            offload_gradients=offload_gradients,
            gradient_checkpointing=gradient_checkpointing,
            progress=progress,
        )
    finally:
        model.train(was_training)
    mask.metadata.update(model_metadata(model))
    return _with_prompt_format(mask, forget)


def _attribute(  # the computation of attribute(), on validated arguments, with the model in eval()
    model,
    forget,
    retain,
    params,
    *,
    method,
    ratio,
    gamma,
    scope,
    backend,
    seed,
    nonfinite,
    max_batches,
    offload_gradients,
    gradient_checkpointing,
    progress,
) -> WeightMask:
    entry = SCORE_METHODS.get(method)  # None for wanda (activations, not a per-weight score)
    if method == "wanda":
        return wanda_mask(
            model,
            forget,
            params,
            ratio=ratio,
            max_batches=max_batches,
            progress=progress,
            check_batch=lambda batch, i: _checked(model, batch, f"wanda activations: batch {i}"),
        )
    select_kw = {
        "ratio": ratio,
        "method": method,
        "scope": scope,
        "backend": backend,
        "seed": seed,
        "nonfinite": nonfinite,
    }
    if not entry.reads_forget:  # scores from the weights alone (or none): no gradients to accumulate
        return mask_from_gradients(params, None, None, **select_kw)
    from wagle.models.checkpointing import activation_checkpointing  # transformers, on use

    with gradient_scope(model, params):
        with activation_checkpointing(model, gradient_checkpointing, keep_eval=True):
            accumulate_gradients(
                model, forget, params, max_batches=max_batches, progress=progress, desc="forget gradients"
            )
            grad_forget = _take_grads(params, to_host=offload_gradients)
            grad_retain = None
            if entry.reads_retain:
                accumulate_gradients(
                    model,
                    retain,
                    params,
                    max_batches=max_batches,
                    progress=progress,
                    desc="retain gradients",
                )
                grad_retain = _take_grads(params)
        logger.info("scoring %d tensors with method=%s", len(params), method)
        return mask_from_gradients(
            params, grad_forget, grad_retain, gamma=gamma, host_gradients=offload_gradients, **select_kw
        )
