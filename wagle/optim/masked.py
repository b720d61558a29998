"""Shared machinery of the masked optimizers: named parameters, mask pairing, state layout, state_dict.

Every parameter is paired by name with its :class:`~wagle.WeightMask` entry and gets a plan:

* ``masked``  - only selected weights are updated; state for them only (``compact``) or param-shaped
  (``dense``, unselected entries never touched);
* ``dense``   - no mask entry and ``unmasked="dense"``: updated like the plain optimizer;
* ``frozen``  - no mask entry and ``unmasked="freeze"``: never updated, no state.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from wagle.mask import MaskMismatchError, WeightMask
from wagle_kernels._runtime import require_triton, triton_supports
from wagle_kernels.bitpack import unpack_bits
from wagle_kernels.mask_bits import block_prefix

STATE_LAYOUTS = ("dense", "compact")
UNMASKED_POLICIES = ("error", "dense", "freeze")
STATE_DTYPES = (torch.float32, torch.bfloat16)


@dataclass
class ParamPlan:
    """How one parameter is updated (see the module docstring)."""

    name: str
    kind: str  # "masked" | "dense" | "frozen"
    numel: int
    packed: torch.Tensor | None = None  # mask bits on the parameter's device
    selected: int = 0
    _flat: torch.Tensor | None = field(default=None, repr=False)
    _prefix: torch.Tensor | None = field(default=None, repr=False)

    def flat_mask(self) -> torch.Tensor:
        """Flat bool mask (torch path; cached)."""
        if self._flat is None:
            self._flat = unpack_bits(self.packed, self.numel)
        return self._flat

    def prefix(self) -> torch.Tensor:
        """Compact-index metadata (Triton path; cached)."""
        if self._prefix is None:
            self._prefix = block_prefix(self.packed, self.numel)
        return self._prefix


def require_nonnegative(**values: float) -> None:
    """Raise a ValueError naming the first hyperparameter that is negative or NaN."""
    for name, value in values.items():
        if not value >= 0.0:
            raise ValueError(f"{name}: must be >= 0, got {value}")


def _pairs(items, where: str) -> list[tuple[str, torch.Tensor]]:
    pairs = []
    for item in items:
        if isinstance(item, torch.Tensor):
            raise TypeError(
                f"{where}: parameters must be (name, tensor) pairs, e.g. model.named_parameters(), "
                "so each one is matched with its mask entry by name"
            )
        name, tensor = item
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{where}: expected (name, tensor) pairs, got ({type(name).__name__}, ...)")
        pairs.append((name, tensor))
    return pairs


def parse_named_param_groups(params) -> list[dict[str, Any]]:
    """``(name, tensor)`` pairs, or dicts with ``params`` = such pairs, -> groups with ``params`` and
    ``param_names``."""
    params = list(params)
    if not params:
        raise ValueError("params: empty parameter list")
    groups = params if isinstance(params[0], Mapping) else [{"params": params}]
    out, seen = [], set()
    for index, group in enumerate(groups):
        if not isinstance(group, Mapping) or "params" not in group:
            raise TypeError(f"params: group {index} must be a dict with a 'params' entry")
        pairs = _pairs(group["params"], f"params (group {index})")
        for name, _ in pairs:
            if name in seen:
                raise ValueError(f"params: parameter {name!r} appears twice")
            seen.add(name)
        rest = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        out.append({**rest, "params": [t for _, t in pairs], "param_names": [n for n, _ in pairs]})
    return out


def make_plans(groups: list[dict], mask: WeightMask, unmasked: str) -> dict[int, ParamPlan]:
    """Pair every parameter with its mask entry; raise on shape mismatch or missing entries."""
    if not isinstance(mask, WeightMask):
        raise TypeError(f"mask: expected a wagle.WeightMask, got {type(mask).__name__}")
    if unmasked not in UNMASKED_POLICIES:
        raise ValueError(f"unmasked: expected one of {UNMASKED_POLICIES}, got {unmasked!r}")
    plans: dict[int, ParamPlan] = {}
    missing = []
    for group in groups:
        for name, param in zip(group["param_names"], group["params"], strict=True):
            if not param.is_floating_point():
                raise TypeError(f"params: {name!r} has dtype {param.dtype}; only floating-point parameters")
            if name in mask:
                if tuple(mask.shape(name)) != tuple(param.shape):
                    raise MaskMismatchError(
                        f"mask: parameter {name!r} has shape {tuple(param.shape)} but its mask entry has "
                        f"{tuple(mask.shape(name))} (a mask made for another model?)"
                    )
                packed = mask.packed(name).to(param.device)
                plans[id(param)] = ParamPlan(name, "masked", param.numel(), packed, mask.selected(name))
            elif unmasked == "error":
                missing.append(name)
            else:
                kind = "dense" if unmasked == "dense" else "frozen"
                plans[id(param)] = ParamPlan(
                    name, kind, param.numel(), selected=param.numel() if kind == "dense" else 0
                )
    if missing:
        raise MaskMismatchError(
            f"mask: no entry for parameter(s) {missing[:5]}"
            + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
            + "; pass unmasked='dense' to update them fully or unmasked='freeze' to keep them fixed"
        )
    return plans


def mask_digest(plans: Iterable[ParamPlan]) -> str:
    """sha256 over names, shapes and mask bits: identifies the exact mask an optimizer state belongs to."""
    digest = hashlib.sha256()
    for plan in plans:
        digest.update(f"{plan.name}:{plan.kind}:{plan.numel}\n".encode())
        if plan.packed is not None:
            digest.update(plan.packed.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


class MaskedOptimizer(torch.optim.Optimizer):
    """Base class: parameter plans, fused/torch dispatch, per-parameter stepping, mask-checked state_dict."""

    def __init__(
        self,
        params,
        mask: WeightMask,
        defaults: dict[str, Any],
        *,
        state_layout: str,
        state_dtype: torch.dtype,
        unmasked: str,
        fused: bool | None,
    ):
        if state_layout not in STATE_LAYOUTS:
            raise ValueError(f"state_layout: expected one of {STATE_LAYOUTS}, got {state_layout!r}")
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype: expected torch.float32 or torch.bfloat16, got {state_dtype}")
        if fused not in (None, True, False):
            raise ValueError(f"fused: expected None, True or False, got {fused!r}")
        groups = parse_named_param_groups(params)
        self._plans = make_plans(groups, mask, unmasked)
        self.state_layout = state_layout
        self.state_dtype = state_dtype
        self.fused = fused
        for group in groups:
            devices = {p.device for p in group["params"]}
            if fused and len(devices) > 1:
                raise ValueError(
                    f"params: a fused group must be on one device, got {sorted(map(str, devices))}"
                )
            if fused:
                require_triton(group["params"], f"{type(self).__name__}(fused=True)")
        super().__init__(groups, defaults)
        self._digest: str | None = None

    # ---- helpers for subclasses -------------------------------------------------------------
    def plan(self, param: torch.Tensor) -> ParamPlan:
        try:
            return self._plans[id(param)]
        except KeyError:
            raise ValueError("this tensor is not a parameter of the optimizer") from None

    def use_fused(self, param: torch.Tensor) -> bool:
        if self.fused is None:
            return param.is_cuda and triton_supports([param])
        return self.fused

    def check_grad(self, name: str, grad: torch.Tensor, param: torch.Tensor) -> None:
        if grad.is_sparse:
            raise TypeError(
                f"{type(self).__name__}: parameter {name!r} has a sparse gradient (not supported)"
            )
        if grad.is_complex() or param.is_complex():
            raise TypeError(f"{type(self).__name__}: parameter {name!r} is complex (not supported)")
        if grad.shape != param.shape:
            raise ValueError(f"{type(self).__name__}: gradient of {name!r} has shape {tuple(grad.shape)}")

    def new_state_tensor(self, param: torch.Tensor, plan: ParamPlan) -> torch.Tensor:
        """A zero state tensor: compact (selected weights) or param-shaped."""
        if plan.kind == "masked" and self.state_layout == "compact":
            return torch.zeros(plan.selected, dtype=self.state_dtype, device=param.device)
        return torch.zeros(param.shape, dtype=self.state_dtype, device=param.device)

    def group_of(self, param: torch.Tensor) -> dict:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise ValueError("this tensor is not a parameter of the optimizer")

    # ---- stepping ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One step for every parameter that has a gradient (frozen ones are skipped)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            items = []
            for name, param in zip(group["param_names"], group["params"], strict=True):
                if param.grad is None:
                    continue
                plan = self.plan(param)
                if plan.kind == "frozen" or (
                    plan.kind == "masked" and plan.selected == 0 and not self._touches_unselected()
                ):
                    continue
                self.check_grad(name, param.grad, param)
                items.append((param, plan))
            self._step_group(group, items)
        return loss

    def _step_group(self, group: dict, items: list[tuple[torch.Tensor, ParamPlan]]) -> None:
        """Step the parameters of one group (subclasses may batch them into multi-tensor launches)."""
        for param, plan in items:
            self._step_param(group, param, plan)

    @torch.no_grad()
    def step_param(self, param: torch.Tensor) -> None:
        """Step one parameter (used by :class:`~wagle.optim.StepInBackward`)."""
        plan = self.plan(param)
        if param.grad is None or plan.kind == "frozen":
            return
        if plan.kind == "masked" and plan.selected == 0 and not self._touches_unselected():
            return
        self.check_grad(plan.name, param.grad, param)
        self._step_param(self.group_of(param), param, plan)

    def _touches_unselected(self) -> bool:
        return False

    def _step_param(self, group: dict, param: torch.Tensor, plan: ParamPlan) -> None:
        raise NotImplementedError

    # ---- memory -------------------------------------------------------------------------------
    def state_nbytes(self) -> int:
        """Bytes held by optimizer state tensors (moments/buffers; the 'step' scalars included)."""
        total = 0
        for state in self.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
        return total

    # ---- state_dict ---------------------------------------------------------------------------
    def _mask_digest(self) -> str:
        if self._digest is None:
            ordered = [self.plan(p) for g in self.param_groups for p in g["params"]]
            self._digest = mask_digest(ordered)
        return self._digest

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["wagle"] = {
            "optimizer": type(self).__name__,
            "mask_digest": self._mask_digest(),
            "state_layout": self.state_layout,
            "state_dtype": str(self.state_dtype),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore state saved by :meth:`state_dict` of an optimizer with the same parameters and mask."""
        meta = state_dict.get("wagle")
        if meta is None:
            raise ValueError("state_dict: not saved by a wagle masked optimizer (no 'wagle' entry)")
        if meta["optimizer"] != type(self).__name__:
            raise ValueError(f"state_dict: saved by {meta['optimizer']}, not {type(self).__name__}")
        if meta["state_layout"] != self.state_layout:
            raise ValueError(
                f"state_dict: saved with state_layout={meta['state_layout']!r}, this optimizer uses "
                f"{self.state_layout!r}"
            )
        if meta["mask_digest"] != self._mask_digest():
            raise MaskMismatchError("state_dict: it was saved for another mask or other parameters")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups, strict=True)
        ):
            raise ValueError("state_dict: parameter groups differ from this optimizer's")
        index_to_param = {}
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            index_to_param.update(zip(saved["params"], group["params"], strict=True))
            for key, value in saved.items():
                if key not in ("params", "param_names"):
                    group[key] = value
        self.state = defaultdict(dict)
        for index, values in state_dict["state"].items():
            param = index_to_param[index]
            self.state[param] = {
                key: (value.to(param.device) if isinstance(value, torch.Tensor) and key != "step" else value)
                for key, value in values.items()
            }
