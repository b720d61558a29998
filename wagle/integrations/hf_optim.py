"""Masked counterparts of the optimizers a Hugging Face ``Trainer`` builds, fed with the Trainer's own
parameter groups.

``Trainer.create_optimizer`` groups the trainable parameters (weight decay for most, none for norms and
biases, as the installed transformers decides) and calls ``optimizer_cls(groups, **kwargs)`` with the
``(cls, kwargs)`` of ``get_optimizer_cls_and_kwargs(args)``. :func:`masked_optimizer_spec` maps
``args.optim`` to a masked class and the Trainer's kwargs; :func:`bind` returns a class that takes the
Trainer's tensor groups, names each tensor by identity (``model.named_parameters()``) and builds the
masked optimizer over exactly those groups.

``args.optim`` mapping:

* AdamW family -> :class:`~wagle.optim.MaskedAdamW` (``torch.optim.AdamW``'s formula on the selected
  weights, moments in ``state_dtype``). Not reproduced: 8-/4-bit quantized moments (bitsandbytes,
  torchao), paged (CPU-evictable) state, the vendor kernels (apex, XLA, NPU), AnyPrecision's Kahan
  summation and state dtypes, and transformers' legacy ``AdamW`` (``adamw_hf``: eps before the bias
  correction, decay after the update).
* ``sgd`` -> :class:`~wagle.optim.MaskedSGD` (momentum, dampening, Nesterov from ``optim_args`` where
  the installed Trainer reads them).
* anything else -> ``ValueError`` naming ``args.optim``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from wagle.errors import UserError
from wagle.mask import WeightMask
from wagle.optim import MaskedAdamW, MaskedOptimizer, MaskedSGD

logger = logging.getLogger(__name__)

#: ``args.optim`` values whose Trainer handler imports only torch/transformers (their kwargs are used)
TORCH_ADAMW = ("adamw_torch", "adamw_torch_fused", "adamw_hf")
#: AdamW variants whose kwargs (lr, betas, eps) are mapped as the Trainer does, and what is not kept
OTHER_ADAMW = {
    "adamw_apex_fused": "apex's fused kernel",
    "adamw_torch_xla": "the XLA syncfree kernel",
    "adamw_torch_npu_fused": "the NPU fused kernel",
    "adamw_anyprecision": "Kahan summation and the moment dtypes of optim_args",
    "adamw_bnb_8bit": "8-bit quantized moments",
    "adamw_8bit": "8-bit quantized moments",
    "adamw_torch_8bit": "8-bit quantized moments",
    "adamw_torch_4bit": "4-bit quantized moments",
    "paged_adamw_32bit": "paged (CPU-evictable) optimizer state",
    "paged_adamw_8bit": "8-bit quantized moments and paged (CPU-evictable) optimizer state",
}
SGD_NAMES = ("sgd",)
SUPPORTED_OPTIM = (*TORCH_ADAMW, *OTHER_ADAMW, *SGD_NAMES)

_ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")
_SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
_IGNORED_KEYS = ("fused", "foreach", "capturable", "differentiable", "initial_lr")  # same math


def optim_name(args) -> str:
    """``args.optim`` as a plain string (it is an enum in transformers' TrainingArguments)."""
    return str(getattr(args.optim, "value", args.optim))


def unsupported(name: str, what: str = "args.optim") -> ValueError:
    return ValueError(
        f"{what}={name!r} has no masked counterpart in wagle; supported: the AdamW family "
        f"({', '.join(n for n in SUPPORTED_OPTIM if n not in SGD_NAMES)}) -> MaskedAdamW, and 'sgd' -> "
        "MaskedSGD"
    )


def masked_kwargs(cls: type, kwargs: Mapping[str, Any], where: str) -> tuple[type, dict[str, Any]]:
    """The masked class and kwargs for a torch ``AdamW``/``SGD`` class and its constructor kwargs
    (kernel choices such as ``fused``/``foreach`` are dropped: the update is the same)."""
    if isinstance(cls, type) and issubclass(cls, torch.optim.AdamW):
        masked, keys = MaskedAdamW, _ADAMW_KEYS
        refused = {"amsgrad": False, "maximize": False, "decoupled_weight_decay": True}
    elif isinstance(cls, type) and issubclass(cls, torch.optim.SGD):
        masked, keys = MaskedSGD, _SGD_KEYS
        refused = {"maximize": False}
    elif getattr(cls, "__name__", "") == "AdamW" and "transformers" in getattr(cls, "__module__", ""):
        masked, keys = MaskedAdamW, _ADAMW_KEYS
        refused = {"correct_bias": True, "no_deprecation_warning": None}
    else:
        raise UserError(
            f"{where}: the Trainer would build {getattr(cls, '__qualname__', cls)!r}, which has no masked "
            "counterpart in wagle (torch.optim.AdamW -> MaskedAdamW, torch.optim.SGD -> MaskedSGD)"
        )
    out = {}
    for key, value in kwargs.items():
        if key in keys:
            out[key] = tuple(value) if key == "betas" else value
        elif key in _IGNORED_KEYS or (key in refused and refused[key] in (None, value)):
            continue
        else:
            raise UserError(
                f"{where}: {cls.__name__} option {key}={value!r} is not supported by {masked.__name__}"
            )
    return masked, out


def masked_optimizer_spec(trainer_cls: type, args, model=None) -> tuple[type, dict[str, Any]]:
    """``(masked class, kwargs)`` for ``args.optim``, as the Trainer would configure its optimizer.

    For ``adamw_torch``/``adamw_torch_fused``/``adamw_hf``/``sgd`` the Trainer's own
    ``get_optimizer_cls_and_kwargs`` (a subclass's override included) supplies the kwargs; for the other
    AdamW variants (whose libraries may not be installed) ``lr``, ``betas`` and ``eps`` are taken from
    ``args`` exactly as the Trainer passes them, and a warning says what is not reproduced."""
    name = optim_name(args)
    if name in TORCH_ADAMW or name in SGD_NAMES:
        cls, kwargs = trainer_cls.get_optimizer_cls_and_kwargs(args, model)
        masked, out = masked_kwargs(cls, kwargs, f"args.optim={name!r}")
        if name == "adamw_hf":
            logger.warning(
                "args.optim='adamw_hf': MaskedAdamW follows torch.optim.AdamW's formula; not reproduced: "
                "transformers' legacy AdamW (eps before the bias correction, weight decay after the update)"
            )
        return masked, out
    if name in OTHER_ADAMW:
        logger.warning(
            "args.optim=%r: MaskedAdamW follows torch.optim.AdamW on the selected weights with fp32 "
            "moments (or wagle_state_dtype); not reproduced: %s",
            name,
            OTHER_ADAMW[name],
        )
        return MaskedAdamW, {
            "lr": args.learning_rate,
            "betas": (args.adam_beta1, args.adam_beta2),
            "eps": args.adam_epsilon,
        }
    raise unsupported(name)


def bind(
    masked_cls: type[MaskedOptimizer],
    model: torch.nn.Module,
    mask: WeightMask,
    **options: Any,
) -> type[MaskedOptimizer]:
    """A subclass of ``masked_cls`` that accepts tensor param groups (as ``Trainer.create_optimizer``
    passes them), names every tensor by identity in ``model.named_parameters()``, drops empty groups
    and adds ``mask`` and ``options`` (``state_layout``, ``state_dtype``, ``unmasked``...).

    The subclass keeps ``masked_cls``'s name, so its ``state_dict`` loads into ``masked_cls`` and back."""
    names = {id(p): n for n, p in model.named_parameters()}

    class Bound(masked_cls):
        def __init__(self, params, **kwargs):
            super().__init__(named_groups(params, names), mask, **kwargs, **options)

    Bound.__name__, Bound.__qualname__ = masked_cls.__name__, masked_cls.__qualname__
    Bound.__doc__ = f"{masked_cls.__name__} bound to a mask and a model's parameter names."
    return Bound


def named_groups(params, names: Mapping[int, str]) -> list[dict[str, Any]]:
    """Param groups of tensors -> groups with ``param_names`` (names by tensor identity); empty groups
    are dropped. Raises if a tensor is not a parameter of the model or nothing is left."""
    params = list(params)
    groups = params if params and isinstance(params[0], Mapping) else [{"params": params}]
    out = []
    for group in groups:
        tensors = list(group["params"])
        if not tensors:
            continue
        if any(not isinstance(t, torch.Tensor) for t in tensors):  # already (name, tensor) pairs
            out.append(dict(group))
            continue
        missing = [i for i, t in enumerate(tensors) if id(t) not in names]
        if missing:
            raise UserError(
                f"optimizer: {len(missing)} tensor(s) of a param group are not parameters of the trained "
                "model (cannot pair them with mask entries by name)"
            )
        out.append({**group, "params": tensors, "param_names": [names[id(t)] for t in tensors]})
    if not out:
        raise UserError("optimizer: the Trainer passed no trainable parameter (every param group is empty)")
    return out


def masked_from_torch_optimizer(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, mask: WeightMask, **options: Any
) -> MaskedOptimizer:
    """The masked counterpart of a freshly built ``torch.optim.AdamW``/``SGD`` (same param groups and
    per-group hyperparameters), for Trainer subclasses whose ``create_optimizer`` builds its own."""
    where = f"optimizer {type(optimizer).__name__}"
    if optimizer.state:
        raise UserError(f"{where}: it has already stepped; a masked optimizer can only replace a fresh one")
    cls, groups = None, []
    for group in optimizer.param_groups:
        settings = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        cls, kept = masked_kwargs(type(optimizer), settings, where)
        groups.append({"params": group["params"], **kept})
    names = {id(p): n for n, p in model.named_parameters()}
    return cls(named_groups(groups, names), mask, **options)
