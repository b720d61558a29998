"""The Wanda baseline: S_ij = |W_ij| * ||X_j||_2, ranked per output row, for every weight matrix the
model applies as a linear map.

Covered, each with the inputs it really sees (forward hooks, summed over all tokens of the batches):

* ``nn.Linear`` weights ``(out, in)`` (an untied ``lm_head`` included; a tied ``lm_head`` is the
  embedding matrix, scored from the ``lm_head`` inputs under the embedding's parameter name);
* ``transformers``' ``Conv1D`` (GPT-2), whose weight is stored transposed, ``(in, out)``: ranked per
  output column;
* mixture-of-experts weights stored as 3-D parameters (transformers 5.x Mixtral, Qwen2-MoE, ...):
  ``gate_up_proj (E, 2I, H)`` and ``down_proj (E, H, I)``, ranked per output row of each expert with
  that expert's own input norms (the tokens routed to it; ``act(gate) * up`` for ``down_proj``);
  and the routers' ``(E, H)`` weights. The expert computation is redone in the hook and compared with
  the module's output, so a layout wagle does not understand is refused instead of scored wrongly.

Not covered, by definition: embedding tables and 1-D parameters (norms, biases). Any other parameter
with two or more dimensions is refused with its name (exclude it, or use another method).
Each row keeps ``floor(ratio * in)`` weights; ties in a row go to the lower column index.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from wagle.errors import UserError
from wagle.mask import WeightMask, parameter_aliases
from wagle_kernels.bitpack import pack_bits

from .from_gradients import num_to_select

Batch = Mapping[str, torch.Tensor]


@dataclass
class _Target:
    """One scored weight: ``layout`` is ``rows`` (out, in), ``columns`` (in, out) or ``experts``
    (E, out, in); ``sq_norms`` the running sum of squared inputs, (in,) or (E, in)."""

    param: torch.nn.Parameter
    layout: str
    sq_norms: torch.Tensor


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain torch models
        return None
    return Conv1D


def _experts_params(module: torch.nn.Module) -> tuple[torch.nn.Parameter, torch.nn.Parameter] | None:
    """``(gate_up_proj, down_proj)`` of an experts module in the (E, 2I, H) / (E, H, I) layout."""
    gate_up = module._parameters.get("gate_up_proj")
    down = module._parameters.get("down_proj")
    if gate_up is None or down is None or gate_up.dim() != 3 or down.dim() != 3:
        return None
    experts, two_inner, hidden = gate_up.shape
    if two_inner % 2 or tuple(down.shape) != (experts, hidden, two_inner // 2):
        return None
    flags = {"is_transposed": False, "has_bias": False, "has_gate": True, "is_concatenated": True}
    if any(getattr(module, flag, default) != default for flag, default in flags.items()):
        return None
    if getattr(module, "has_post_expert_norm", False) or not callable(getattr(module, "act_fn", None)):
        return None
    return gate_up, down


def _is_router(module: torch.nn.Module) -> bool:
    weight = module._parameters.get("weight")
    return (
        weight is not None
        and weight.dim() == 2
        and type(module).__name__.endswith("Router")
        and len(module._parameters) == 1
    )


def _close(recomputed: torch.Tensor, actual: torch.Tensor) -> bool:
    half = actual.dtype in (torch.float16, torch.bfloat16)
    scale = float(actual.detach().float().abs().max()) if actual.numel() else 0.0
    tol = 3e-2 if half else 1e-4
    return torch.allclose(recomputed.float(), actual.detach().float(), rtol=tol, atol=tol * scale + 1e-6)


def _experts_inputs(args: tuple, kwargs: dict):
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args[:3]) + [kwargs.get(n) for n in names[len(args[:3]) :]]
    if len(values) != 3 or any(v is None for v in values):
        return None
    return values


def _refuse_layout(module_name: str, module: torch.nn.Module, why: str) -> UserError:
    return UserError(
        f"method='wanda': cannot score {module_name} ({type(module).__name__}): {why}; exclude its "
        f"parameters (exclude=['{module_name}.*'], CLI: --exclude '{module_name}.*') or use another method"
    )


def wanda_mask(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    params: Mapping[str, torch.nn.Parameter],
    *,
    ratio: float,
    max_batches: int | None = None,
    progress: bool = True,
    check_batch=None,
) -> WeightMask:
    """Wanda baseline: S_ij = |W_ij| * ||X_j||_2 (input-activation norm over all tokens of ``batches``),
    ranked per output row (each row keeps floor(ratio * in_features)), for ``nn.Linear`` and
    ``Conv1D`` weights, mixture-of-experts matrices (per expert) and routers; see the module docstring.
    Ties in a row go to the lower column index. ``check_batch(batch, index)`` is called on every
    batch before it runs. Raises :class:`~wagle.errors.UserError` for a selected parameter of two or
    more dimensions that it cannot score, and when no selected parameter can be scored."""
    canonical = {id(p): name for name, p in model.named_parameters()}
    aliases = parameter_aliases(model)
    conv1d = _conv1d_type()
    targets: dict[str, _Target] = {}
    hooks = []

    def add(param, layout, size):
        name = canonical.get(id(param))
        if name is None or name not in params:
            return None
        if name not in targets:
            targets[name] = _Target(
                param, layout, torch.zeros(size, dtype=torch.float32, device=param.device)
            )
        return name

    def input_hook(name, width):
        def hook(module, inputs, output):
            x = inputs[0].detach().float().reshape(-1, width)
            targets[name].sq_norms += (x * x).sum(0)

        return hook

    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            name = add(module.weight, "rows", module.in_features)
            if name:
                hooks.append((module, input_hook(name, module.in_features), False))
        elif conv1d is not None and isinstance(module, conv1d):
            width = module.weight.shape[0]
            name = add(module.weight, "columns", width)
            if name:
                hooks.append((module, input_hook(name, width), False))
        elif _experts_params(module) is not None:
            gate_up, down = _experts_params(module)
            experts, two_inner, hidden = gate_up.shape
            gu_name = add(gate_up, "experts", (experts, hidden))
            d_name = add(down, "experts", (experts, two_inner // 2))
            if gu_name or d_name:
                hooks.append((module, _experts_hook(module_name, module, targets, gu_name, d_name), True))
        elif _is_router(module):
            weight = module.weight
            name = add(weight, "rows", weight.shape[1])
            if name:
                hooks.append((module, _router_hook(module_name, module, targets, name), False))

    embeddings = {
        canonical[id(m.weight)]
        for m in model.modules()
        if isinstance(m, torch.nn.Embedding) and id(m.weight) in canonical
    }
    unsupported = [n for n, p in params.items() if p.dim() >= 2 and n not in targets and n not in embeddings]
    if unsupported:
        raise UserError(
            f"method='wanda': {len(unsupported)} selected weight matrices are not applied as nn.Linear, "
            f"Conv1D or mixture-of-experts layers and cannot be scored: {unsupported[:5]}"
            + (f" (+{len(unsupported) - 5} more)" if len(unsupported) > 5 else "")
            + "; exclude them (exclude=..., CLI: --exclude) or use another method"
        )
    if not targets:
        raise UserError(
            "method='wanda': no nn.Linear, Conv1D or mixture-of-experts weight among the selected parameters"
        )
    handles = [
        m.register_forward_hook(hook, with_kwargs=True) if kw else m.register_forward_hook(hook)
        for m, hook, kw in hooks
    ]
    device = next(iter(params.values())).device
    try:
        with torch.no_grad():
            for count, batch in enumerate(tqdm(batches, desc="wanda activations", disable=not progress)):
                if max_batches is not None and count >= max_batches:
                    break
                if not isinstance(batch, Mapping) or "input_ids" not in batch:
                    raise TypeError("batches must be mappings with 'input_ids', e.g. from make_dataloader")
                if check_batch is not None:
                    batch = check_batch(batch, count)
                inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
                model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    entries = {}
    for name in params:
        if name in targets:
            target = targets[name]
            entries[name] = (tuple(target.param.shape), pack_bits(_select(target, ratio)))
    metadata = {"method": "wanda", "ratio": repr(float(ratio)), "scope": "per_row"}
    tied = {alias: name for alias, name in aliases.items() if name in targets}
    if tied:
        metadata["wanda_tied"] = ", ".join(f"{a} = {n}" for a, n in sorted(tied.items()))
    return WeightMask(entries, metadata)


def _select(target: _Target, ratio: float) -> torch.Tensor:
    """The top ``floor(ratio * in)`` of every output row of |W| * ||X||; stable, so ties keep the lower
    column index."""
    weight = target.param.detach().float().abs()
    norms = target.sq_norms.sqrt()
    if target.layout == "rows":
        scores, axis = weight * norms[None, :], 1
    elif target.layout == "columns":
        scores, axis = weight * norms[:, None], 0
    else:
        scores, axis = weight * norms[:, None, :], 2
    keep = num_to_select(ratio, scores.shape[axis])
    order = torch.sort(scores, dim=axis, descending=True, stable=True).indices.narrow(axis, 0, keep)
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    chosen.scatter_(axis, order, True)
    return chosen


def _router_hook(module_name, module, targets, name):
    def hook(mod, inputs, output):
        weight = mod.weight
        x = inputs[0].detach().reshape(-1, weight.shape[1])
        logits = output[0] if isinstance(output, tuple) else output
        if not _close(F.linear(x, weight.detach()), logits.reshape(x.shape[0], -1)):
            raise _refuse_layout(module_name, mod, "its output is not a linear map of its input")
        x = x.float()
        targets[name].sq_norms += (x * x).sum(0)

    return hook


def _experts_hook(module_name, module, targets, gate_up_name, down_name):
    """Per-expert input norms of both expert matrices, from the routed tokens; the expert computation
    (gate, up = x W_gu^T; h = act(gate) * up; y = sum_k w_k h W_d^T) is redone and checked against
    the module's output."""

    def hook(mod, args, kwargs, output):
        inputs = _experts_inputs(args, kwargs)
        if inputs is None or not isinstance(output, torch.Tensor):
            raise _refuse_layout(module_name, mod, "unexpected call signature")
        hidden, index, weights = inputs
        gate_up, down = _experts_params(mod)
        x = hidden.detach().reshape(-1, gate_up.shape[2])
        recomputed = torch.zeros_like(x)
        for expert in range(gate_up.shape[0]):
            rows, slot = torch.where(index.reshape(x.shape[0], -1) == expert)
            if rows.numel() == 0:
                continue
            xe = x[rows]
            gate, up = F.linear(xe, gate_up[expert].detach()).chunk(2, dim=-1)
            h = mod.act_fn(gate) * up
            y = F.linear(h, down[expert].detach()) * weights.reshape(x.shape[0], -1)[rows, slot, None]
            recomputed.index_add_(0, rows, y.to(recomputed.dtype))
            if gate_up_name:
                targets[gate_up_name].sq_norms[expert] += xe.float().pow(2).sum(0)
            if down_name:
                targets[down_name].sq_norms[expert] += h.float().pow(2).sum(0)
        if not _close(recomputed, output.reshape(recomputed.shape)):
            raise _refuse_layout(module_name, mod, "the recomputed expert outputs differ from the module's")

    return hook


__all__ = ["wanda_mask"]
