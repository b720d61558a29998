"""``mask_from_gradients``: the public entry point from (weights, g_f, g_r) to a :class:`WeightMask`."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from wagle.errors import UserError
from wagle.mask import WeightMask
from wagle.validation import check_gamma, check_ratio, check_seed
from wagle_kernels._runtime import require_triton, triton_supports
from wagle_kernels.scores import ScoreMethod, get_method, inverse_gamma, method_names
from wagle_kernels.select import (
    ScoreSource,
    ScoreSpec,
    SelectionStats,
    Selector,
    TorchSelector,
    TritonSelector,
    select_top_k,
)

SCOPES = ("global", "per_tensor")
BACKENDS = ("auto", "triton", "torch")
NONFINITE_POLICIES = ("error", "lowest")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

TensorMap = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def num_to_select(ratio: float, numel: int) -> int:
    """k = floor(ratio * N), computed in float64 (exact for N < 2^53 up to the rounding of ``ratio``)."""
    return min(numel, max(0, math.floor(ratio * numel)))


def _as_dict(tensors: TensorMap | None, argument: str) -> dict[str, torch.Tensor | None] | None:
    if tensors is None:
        return None
    if isinstance(tensors, torch.nn.Module):
        raise TypeError(f"{argument}: pass a mapping name -> tensor (e.g. dict(model.named_parameters()))")
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    out: dict[str, torch.Tensor | None] = {}
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"{argument}: expected a mapping name -> tensor or (name, tensor) pairs")
        name, value = item
        if name in out:
            raise UserError(f"{argument}: duplicate name {name!r}")
        out[name] = value
    return out


def _check_tensor(value, argument: str, name: str, shape: tuple[int, ...] | None) -> torch.Tensor:
    if value is None:
        raise UserError(f"{argument}[{name!r}] is missing (None): did that parameter receive a gradient?")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{argument}[{name!r}]: expected a tensor, got {type(value).__name__}")
    if value.is_sparse or value.layout != torch.strided:
        raise TypeError(f"{argument}[{name!r}]: sparse tensors are not supported")
    if value.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{argument}[{name!r}]: dtype {value.dtype} is not supported; "
            "expected float32, bfloat16 or float16"
        )
    if shape is not None and tuple(value.shape) != shape:
        raise UserError(
            f"{argument}[{name!r}]: shape {tuple(value.shape)} does not match params[{name!r}] shape {shape}"
        )
    return value


def _same_keys(reference: dict, other: dict, argument: str) -> None:
    if list(other) == list(reference):
        return
    missing = [n for n in reference if n not in other]
    extra = [n for n in other if n not in reference]
    if missing or extra:
        raise UserError(
            f"{argument}: names differ from params (missing {missing[:5]}, unexpected {extra[:5]})"
        )


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().reshape(-1).contiguous()


def _selected_counts(stats: SelectionStats, shapes: dict[str, tuple[int, ...]]) -> dict[str, int] | None:
    """Set bits per tensor as the selection counted them (None when it did not count every tensor)."""
    counts = dict(stats.selected)
    for name, shape in shapes.items():
        if name not in counts and math.prod(shape) == 0:
            counts[name] = 0
    return counts if set(counts) >= set(shapes) else None


def check_selection_options(
    method: str, scope: str, backend: str, nonfinite: str, ratio, gamma
) -> tuple[ScoreMethod, float]:
    """Validate the options every selection takes; returns the method's registry entry and the ratio."""
    if method not in method_names():
        raise UserError(f"method: unknown method {method!r}; expected one of {list(method_names())}")
    entry = get_method(method)
    if scope not in SCOPES:
        raise UserError(f"scope: unknown scope {scope!r}; expected one of {list(SCOPES)}")
    if backend not in BACKENDS:
        raise UserError(f"backend: unknown backend {backend!r}; expected one of {list(BACKENDS)}")
    if nonfinite not in NONFINITE_POLICIES:
        raise UserError(f"nonfinite: expected one of {list(NONFINITE_POLICIES)}, got {nonfinite!r}")
    ratio = check_ratio(ratio)
    if entry.needs_gamma:
        check_gamma(gamma, method)
    return entry, ratio


def draw_seed() -> int:
    """A seed for the ``random`` baseline drawn from torch's default generator, in ``[0, 2^31 - 1)``."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def score_spec(entry: ScoreMethod, gamma: float, seed: int) -> ScoreSpec:
    """The kernels' score spec: the method, ``1 / gamma`` for methods with a retain floor (else 1), seed."""
    return ScoreSpec(entry.name, inverse_gamma(gamma) if entry.needs_gamma else 1.0, seed)


def selector_class(backend: str, device: torch.device, where: str) -> type[Selector]:
    """The selector of ``backend`` on ``device``: ``auto`` takes Triton on CUDA devices it supports
    and torch otherwise; ``triton`` raises (naming ``where``) if Triton cannot run there."""
    probe = [torch.empty(0, device=device)]
    if backend == "auto":
        use_triton = device.type == "cuda" and triton_supports(probe)
    else:
        use_triton = backend == "triton"
        if use_triton:
            require_triton(probe, f"{where}(backend='triton')")
    return TritonSelector if use_triton else TorchSelector


def mask_from_gradients(
    params: TensorMap,
    grad_forget: TensorMap | None,
    grad_retain: TensorMap | None = None,
    *,
    ratio: float,
    method: str = "wagle",
    gamma: float = 1e-6,
    scope: str = "global",
    backend: str = "auto",
    seed: int | None = None,
    nonfinite: str = "error",
    host_gradients: bool = False,
    return_stats: bool = False,
) -> WeightMask | tuple[WeightMask, SelectionStats]:
    """Select the top ``ratio`` fraction of weights by attribution score and return a bit-packed mask.

    Scores (fp32, see :mod:`wagle_kernels.scores`): ``wagle`` S = |(w - g_r/gamma) * g_f|,
    ``snip`` |w * g_f|, ``gradient`` |g_f|, ``magnitude`` |w|, ``random`` a counter-based hash of
    ``(seed, global position)``.

    Exactly k = floor(ratio * N) weights are selected (N = all weights over all tensors for
    ``scope="global"``; per tensor for ``scope="per_tensor"``). Ties are broken by global position:
    tensors in the order of ``params``, then flat index, lower position wins.

    Args:
        params: name -> weight tensor (or ``(name, tensor)`` pairs, e.g. ``model.named_parameters()``).
        grad_forget: name -> forget-set gradient g_f (same names and shapes); unused by magnitude/random.
        grad_retain: name -> retain-set gradient g_r; required by ``wagle`` only.
        ratio: fraction of weights to select, in [0, 1]; 0 selects nothing, 1 everything.
        method: one of ``wagle``, ``snip``, ``gradient``, ``magnitude``, ``random``.
        gamma: the Hessian approximation gamma * I of the retain loss (``wagle`` only), > 0.
        scope: ``global`` (one ranking over all tensors) or ``per_tensor``.
        backend: ``triton`` (kernels; CUDA, or CPU under TRITON_INTERPRET=1), ``torch`` (reference), or
            ``auto`` (triton for CUDA tensors, torch otherwise). Both give bit-identical masks.
        seed: seed of ``random`` (None draws one from torch's default generator).
        nonfinite: ``error`` (raise, naming the tensor, when a score is NaN/Inf) or ``lowest``
            (non-finite scores rank below every finite score).
        host_gradients: allow gradients in CPU memory while ``params`` live on an accelerator; each pass
            copies them to the device one tensor at a time (device memory: one tensor instead of a
            model-sized buffer; time: one host-to-device copy of the gradients per pass).
        return_stats: also return a :class:`SelectionStats` (passes over the inputs, non-finite counts).
    """
    entry, ratio = check_selection_options(method, scope, backend, nonfinite, ratio, gamma)
    uses_weight, uses_forget, uses_retain = entry.reads

    weights = _as_dict(params, "params")
    forget = _as_dict(grad_forget, "grad_forget")
    retain = _as_dict(grad_retain, "grad_retain")
    if uses_forget and forget is None:
        raise UserError(f"grad_forget: method={method!r} needs the forget-set gradients")
    if uses_retain and retain is None:
        raise UserError(f"grad_retain: method={method!r} needs the retain-set gradients")

    shapes: dict[str, tuple[int, ...]] = {}
    for name, value in weights.items():
        shapes[name] = tuple(_check_tensor(value, "params", name, None).shape)
    for argument, mapping in (("grad_forget", forget), ("grad_retain", retain)):
        if mapping is not None:
            _same_keys(weights, mapping, argument)
            for name in weights:
                _check_tensor(mapping[name], argument, name, shapes[name])

    used = [
        weights if uses_weight else None,
        forget if uses_forget else None,
        retain if uses_retain else None,
    ]
    devices = {
        t.device for mapping in (weights, forget, retain) if mapping is not None for t in mapping.values()
    }
    param_devices = {t.device for t in weights.values()}
    if host_gradients and len(param_devices) == 1:
        devices -= {torch.device("cpu")}  # gradients kept in host memory are streamed to the params' device
        devices |= param_devices
    if len(devices) > 1:
        raise UserError(
            f"params/grad_forget/grad_retain: tensors are on different devices {sorted(map(str, devices))}"
            + ("" if host_gradients else " (host_gradients=True allows gradients in CPU memory)")
        )
    device = devices.pop() if devices else torch.device("cpu")

    if seed is None:  # only seeded methods (the random baseline) draw one; other masks stay reproducible
        seed = draw_seed() if entry.needs_seed else 0
    check_seed(seed)

    sources, start = [], 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        w, gf, gr = (None if m is None else _flat(m[name]) for m in used)
        sources.append(ScoreSource(name, numel, start, w, gf, gr))
        start += numel

    selector_cls = selector_class(backend, device, "mask_from_gradients")
    spec = score_spec(entry, gamma, seed)
    groups = [sources] if scope == "global" else [[s] for s in sources]
    stats = SelectionStats()
    packed: dict[str, torch.Tensor] = {}
    for group in groups:
        n = sum(s.numel for s in group)
        k = num_to_select(ratio, n)
        selector: Selector = selector_cls(group, spec, device=device)
        if nonfinite == "error" and entry.can_be_nonfinite:
            counts = selector.nonfinite_counts()
            bad = {name: c for name, c in counts.items() if c}
            if bad:
                name, count = next(iter(bad.items()))
                raise UserError(
                    f"non-finite attribution score: {count} NaN/Inf score(s) in tensor {name!r}"
                    + (f" and {len(bad) - 1} more tensor(s)" if len(bad) > 1 else "")
                    + f" (method={method!r}); check the weights/gradients, or rank them lowest "
                    "(nonfinite='lowest'; CLI: --nonfinite lowest)"
                )
        packed.update(select_top_k(selector, k, n, stats))

    metadata = {"method": method, "ratio": repr(ratio), "scope": scope}
    if entry.needs_seed:
        metadata["seed"] = str(seed)
    if entry.needs_gamma:
        metadata["gamma"] = repr(float(gamma))
    mask = WeightMask(
        {name: (shapes[name], packed[name]) for name in shapes},
        metadata,
        counts=_selected_counts(stats, shapes),
    )
    return (mask, stats) if return_stats else mask
