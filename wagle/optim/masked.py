"""Shared machinery of the masked optimizers: named parameters, mask pairing, state layout, state_dict.

Every parameter is given as ``(name, tensor)`` (``model.named_parameters()``), paired by name with its
:class:`~wagle.WeightMask` entry (shapes checked) and gets a :class:`ParamPlan`:

* ``masked`` - only the selected weights are updated. Their state is param-shaped (``dense`` layout;
  unselected entries stay zero and are never used) or holds the selected weights only, in flat order
  (``compact`` layout: state memory = ratio x dense). ``state_layout="auto"`` (the default) picks the
  layout per parameter by its bytes (:func:`auto_layout`). A parameter with no selected weight gets no
  state and is skipped.
* ``dense``  - no mask entry and ``unmasked="dense"``: updated like the plain optimizer.
* ``frozen`` - no mask entry and ``unmasked="freeze"``: never updated, no state.

Compact index metadata (Triton path): per block of ``STATE_BLOCK`` weights, the exclusive prefix count of
selected weights (int64, derived once per device from the static mask: 8 bytes per 2048 weights). The
torch path unpacks a parameter's mask bits when it steps it; on CPU it also keeps the selected
positions (int32, 4 bytes per selected weight) because ``nonzero`` would dominate the step.

``state_dict()`` adds a ``"wagle"`` entry (optimizer class, mask fingerprint, a digest of the names,
shapes and mask bits of the optimizer's parameters, state layout as asked, the layout each masked
parameter resolved to, and dtype); ``load_state_dict`` rejects a state saved for another mask, another
layout or other parameters, and checks every state tensor's size. An ``"auto"`` optimizer adopts the
saved per-parameter layouts, so a state loads identically wherever the rule would resolve differently.
Both run through ``torch.optim.Optimizer``'s own ``state_dict``/``load_state_dict``: the wagle parts are
hooks that run after the user's pre-hooks and before the user's post-hooks, so hooks registered with
``register_state_dict_*_hook`` / ``register_load_state_dict_*_hook`` fire as on any torch optimizer.
Plans are keyed by the parameter tensors themselves, like ``Optimizer.state``, so they follow the
parameters through ``copy.deepcopy`` and pickling.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from wagle.errors import UserError
from wagle.mask import MaskMismatchError, WeightMask
from wagle_kernels._runtime import require_triton, triton_supports
from wagle_kernels.bitpack import unpack_bits
from wagle_kernels.mask_bits import STATE_BLOCK, block_prefix

STATE_LAYOUTS = ("auto", "dense", "compact")
UNMASKED_POLICIES = ("error", "dense", "freeze")
STATE_DTYPES = (torch.float32, torch.bfloat16)
STATE_DICT_VERSION = 3  # 3: per-parameter resolved layouts ("layouts"); 2 loads as its one layout
INDEX_BYTES_PER_BLOCK = 8  # compact-index metadata of the Triton path: one int64 per STATE_BLOCK weights
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class ParamPlan:
    """How one parameter is updated (see the module docstring)."""

    name: str
    kind: str  # "masked" | "dense" | "frozen"
    shape: tuple[int, ...]
    numel: int
    selected: int = 0
    packed: torch.Tensor | None = None  # the mask bits as the mask holds them (uint8)
    layout: str = "dense"  # of its state tensors: "compact" only for masked parameters
    _bits: dict[torch.device, torch.Tensor] = field(default_factory=dict, repr=False)
    _prefix: dict[torch.device, torch.Tensor] = field(default_factory=dict, repr=False)
    _index: dict[torch.device, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def masked(self) -> bool:
        return self.kind == "masked"

    def bits(self, device: torch.device) -> torch.Tensor:
        """The mask bits on ``device`` (copied once per device)."""
        bits = self._bits.get(device)
        if bits is None:
            bits = self.packed.to(device).contiguous()
            self._bits[device] = bits
        return bits

    def prefix(self, device: torch.device) -> torch.Tensor:
        """Compact-index metadata on ``device``: int64 exclusive prefix of selected counts per block."""
        prefix = self._prefix.get(device)
        if prefix is None:
            prefix = block_prefix(self.bits(device), self.numel)
            self._prefix[device] = prefix
        return prefix

    def indices(self, device: torch.device) -> torch.Tensor | None:
        """Flat positions of the selected weights (int32 below 2^31 weights), cached for CPU parameters
        only (the CPU torch path would otherwise spend most of a step in ``nonzero``; 4 bytes per
        selected weight, counted in :meth:`metadata_nbytes`); None elsewhere."""
        if device.type != "cpu":
            return None
        index = self._index.get(device)
        if index is None:
            index = self.selected_flat(device).nonzero().squeeze(1)
            if self.numel < 2**31:
                index = index.to(torch.int32)
            self._index[device] = index
        return index

    def selected_flat(self, device: torch.device) -> torch.Tensor:
        """Flat bool mask on ``device`` (unpacked on demand, not kept)."""
        return unpack_bits(self.bits(device), self.numel)

    @property
    def compact(self) -> bool:
        """Whether the state holds the selected weights only."""
        return self.masked and self.layout == "compact"

    def state_numel(self) -> int:
        """Elements of each state tensor: ``selected`` (compact layout, masked) or ``numel``."""
        return self.selected if self.compact else self.numel

    def metadata_nbytes(self) -> int:
        """Bytes of cached index metadata and device copies of the mask bits."""
        total = sum(t.numel() * t.element_size() for t in (*self._prefix.values(), *self._index.values()))
        if self.packed is not None:
            total += sum(
                t.numel() * t.element_size()
                for t in self._bits.values()
                if t.data_ptr() != self.packed.data_ptr()
            )
        return total


def compact_overhead_bytes(numel: int, path: str) -> int:
    """Bytes the compact layout keeps that the dense one does not: ``8 * ceil(numel / 2048)`` (the int64
    block prefix of the Triton kernel, ``path="fused"``, which also reads it once per step) or 0 (the
    torch path, ``"torch"``: both layouts use the same positions of the selected weights)."""
    return INDEX_BYTES_PER_BLOCK * -(-numel // STATE_BLOCK) if path == "fused" else 0


def auto_layout(numel: int, selected: int, states: int, state_bytes: int, path: str) -> str:
    """The layout ``state_layout="auto"`` gives a masked parameter of ``numel`` weights, ``selected`` of
    them selected, with ``states`` state tensors of ``state_bytes`` bytes per element:

        compact  iff  states > 0  and  states * state_bytes * (numel - selected) >= compact_overhead_bytes

    i.e. the state memory the compact layout saves covers its index metadata. Per step a state element
    is read and written (twice its bytes) while the fused kernel reads the metadata once, so the same
    rule makes the compact step move no more bytes than the dense one. On the fused path compact holds
    up to ``1 - 8 / (2048 * states * state_bytes)`` selected (99.95% for AdamW with fp32 moments,
    99.9% with bf16); on the torch path always. Without state tensors there is nothing to save: dense."""
    saved = states * state_bytes * (numel - selected)
    return "compact" if states > 0 and saved >= compact_overhead_bytes(numel, path) else "dense"


def require_nonnegative(**values: float) -> None:
    """Raise a ValueError naming the first hyperparameter that is negative or NaN."""
    for name, value in values.items():
        if not float(value) >= 0.0:
            raise UserError(f"{name}: must be >= 0, got {value}")


def _named_pairs(group: Mapping, where: str) -> tuple[list[str], list[torch.Tensor]]:
    """``(names, tensors)`` of a group given as ``(name, tensor)`` pairs, or as tensors with an explicit
    ``param_names`` list (the form torch.optim's state_dict uses)."""
    params = group["params"]
    if isinstance(params, torch.Tensor):
        raise TypeError(f"{where}: 'params' must be a list of (name, tensor) pairs, got a single tensor")
    params = list(params)
    explicit = group.get("param_names")
    if explicit is not None:
        names = list(explicit)
        if len(names) != len(params) or not all(isinstance(t, torch.Tensor) for t in params):
            raise TypeError(f"{where}: 'param_names' must name each tensor of 'params' once")
        tensors = params
    else:
        names, tensors = [], []
        for item in params:
            if isinstance(item, torch.Tensor):
                raise TypeError(
                    f"{where}: parameters must be (name, tensor) pairs, e.g. model.named_parameters(), "
                    "so each one is paired with its mask entry by name"
                )
            if not isinstance(item, tuple | list) or len(item) != 2:
                raise TypeError(f"{where}: expected (name, tensor) pairs, got {type(item).__name__}")
            name, tensor = item
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"{where}: expected (name, tensor) pairs, got "
                    f"({type(name).__name__}, {type(tensor).__name__})"
                )
            names.append(name)
            tensors.append(tensor)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{where}: parameter names must be strings, got {type(name).__name__}")
    return names, tensors


def _is_dtensor(tensor) -> bool:
    from wagle.distributed.attribution import is_dtensor

    return is_dtensor(tensor)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def mask_digest(plans: Iterable[ParamPlan]) -> str:
    """sha256 over names, kinds, shapes and mask bits: the exact mask an optimizer state belongs to."""
    digest = hashlib.sha256()
    for plan in plans:
        digest.update(f"{plan.name}:{plan.kind}:{','.join(map(str, plan.shape))}\n".encode())
        if plan.packed is not None:
            digest.update(plan.packed.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class MaskedOptimizer(torch.optim.Optimizer):
    """Base class: parameter plans, fused/torch dispatch, per-parameter stepping, mask-checked state_dict.

    Subclasses implement :meth:`_step_items` (one param group's parameters that have gradients).
    """

    #: per-parameter state tensors a subclass keeps (for validation on load)
    state_tensor_keys: tuple[str, ...] = ()

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
        if isinstance(params, torch.Tensor):
            raise TypeError(
                "params: expected (name, tensor) pairs (e.g. model.named_parameters()), got a tensor"
            )
        params = list(params)
        # DTensor (FSDP2) parameters step on their local shards with the local bits of the mask
        from wagle.distributed.optim import localize_mask

        mask, self._shard_group = localize_mask(params, mask)
        if not isinstance(mask, WeightMask):
            raise TypeError(f"mask: expected a wagle.WeightMask, got {type(mask).__name__}")
        if state_layout not in STATE_LAYOUTS:
            raise UserError(f"state_layout: expected one of {STATE_LAYOUTS}, got {state_layout!r}")
        if state_layout == "compact" and self.touches_unselected():
            raise UserError("decay_unselected=True updates every weight, so it needs state_layout='dense'")
        if state_dtype not in STATE_DTYPES:
            raise UserError(f"state_dtype: expected torch.float32 or torch.bfloat16, got {state_dtype}")
        if unmasked not in UNMASKED_POLICIES:
            raise UserError(f"unmasked: expected one of {UNMASKED_POLICIES}, got {unmasked!r}")
        if fused not in (None, True, False):
            raise UserError(f"fused: expected None, True or False, got {fused!r}")
        self.mask = mask
        self.state_layout = state_layout
        self.state_dtype = state_dtype
        self.unmasked = unmasked
        self.fused = fused
        self._plans: dict[torch.Tensor, ParamPlan] = {}  # keyed by the tensor, as Optimizer.state
        self._group_index: dict[torch.Tensor, int] = {}
        self._digest: str | None = None
        if not params:
            raise UserError("params: empty parameter list")
        if not isinstance(params[0], Mapping):
            params = [{"params": params}]
        super().__init__(params, defaults)

    #: attributes kept through pickling/deepcopy (torch.optim keeps only defaults, state, param_groups)
    _extra_state_attrs = (
        "mask",
        "state_layout",
        "state_dtype",
        "unmasked",
        "fused",
        "_plans",
        "_group_index",
        "_digest",
        "_shard_group",
        "decay_unselected",
        "launches",
    )

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._extra_state_attrs if k in self.__dict__})
        return state

    # ---- parameter groups ---------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of ``(name, tensor)`` pairs (or tensors plus ``param_names``), each paired with
        its mask entry; raises on a shape mismatch, a missing entry (``unmasked="error"``), a
        non-float/complex/non-contiguous parameter, a duplicate, or mixed devices when ``fused=True``."""
        if not isinstance(param_group, Mapping) or "params" not in param_group:
            raise TypeError("params: each group must be a dict with a 'params' entry")
        where = f"params (group {len(self.param_groups)})"
        names, tensors = _named_pairs(param_group, where)
        if not tensors:
            raise UserError(f"{where}: empty parameter group")
        known = {plan.name for plan in self._plans.values()}
        plans, missing, seen, seen_ids = [], [], set(), set()
        for name, param in zip(names, tensors, strict=True):
            if name in known or name in seen:
                raise UserError(f"{where}: parameter {name!r} appears twice")
            if param in self._plans or id(param) in seen_ids:
                raise UserError(f"{where}: parameter {name!r} is the same tensor as another parameter")
            seen.add(name)
            seen_ids.add(id(param))
            plans.append(self._make_plan(name, param, missing, where))
        if missing:
            raise MaskMismatchError(
                f"mask: no entry for parameter(s) {missing[:5]}"
                + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
                + "; pass unmasked='dense' to update them fully or unmasked='freeze' to keep them fixed"
            )
        if self.fused:
            devices = {t.device for t in tensors}
            if len(devices) > 1:
                raise UserError(
                    f"{where}: a fused group must be on one device, got {sorted(map(str, devices))} "
                    f"(parameters {names[:3]}...)"
                )
            require_triton(tensors, f"{type(self).__name__}(fused=True)")
            wide = [n for n, t in zip(names, tensors, strict=True) if t.dtype not in FUSED_DTYPES]
            if wide:
                raise TypeError(
                    f"{where}: the fused kernel handles fp32/bf16/fp16 parameters; {wide[:3]} are "
                    f"{tensors[names.index(wide[0])].dtype} (use fused=False or None)"
                )
        rest = {k: v for k, v in param_group.items() if k not in ("params", "param_names")}
        index = len(self.param_groups)
        super().add_param_group({**rest, "params": tensors, "param_names": names})
        for param, plan in zip(tensors, plans, strict=True):
            self._plans[param] = plan
            self._group_index[param] = index
        self._digest = None

    def _make_plan(self, name: str, param: torch.Tensor, missing: list[str], where: str) -> ParamPlan:
        param = _local(param)
        if param.is_complex() or not param.is_floating_point():
            raise TypeError(f"{where}: {name!r} has dtype {param.dtype}; only real floating-point parameters")
        if param.is_sparse or not param.is_contiguous():
            raise UserError(f"{where}: {name!r} must be a dense contiguous tensor")
        shape = tuple(param.shape)
        if name in self.mask:
            if tuple(self.mask.shape(name)) != shape:
                raise MaskMismatchError(
                    f"mask: parameter {name!r} has shape {shape} but its mask entry has "
                    f"{tuple(self.mask.shape(name))} (a mask made for another model?)"
                )
            plan = ParamPlan(
                name, "masked", shape, param.numel(), self.mask.selected(name), self.mask.packed(name)
            )
            plan.layout = self._layout_for(plan, param)
            return plan
        if self.unmasked == "error":
            missing.append(name)
            return ParamPlan(name, "frozen", shape, param.numel())
        if self.unmasked == "dense":
            return ParamPlan(name, "dense", shape, param.numel(), param.numel())
        return ParamPlan(name, "frozen", shape, param.numel())

    def _layout_for(self, plan: ParamPlan, param: torch.Tensor) -> str:
        """The state layout of a masked parameter: as asked, or by :func:`auto_layout` for ``"auto"``
        (dense when unselected weights are updated too)."""
        if self.state_layout != "auto":
            return self.state_layout
        if self.touches_unselected():
            return "dense"
        fused = bool(self.fused) if self.fused is not None else self.use_fused(param)
        path = "fused" if fused else "torch"
        state_bytes = torch.empty(0, dtype=self.state_dtype).element_size()
        return auto_layout(plan.numel, plan.selected, len(self.state_tensor_keys), state_bytes, path)

    def layouts(self) -> dict[str, str]:
        """The resolved state layout of every masked parameter, by name."""
        return {plan.name: plan.layout for _, plan in self.named_plans() if plan.masked}

    def plan(self, param: torch.Tensor) -> ParamPlan:
        """The :class:`ParamPlan` of one of this optimizer's parameters."""
        plan = self._plans.get(param)
        if plan is None:
            raise UserError("this tensor is not a parameter of the optimizer")
        return plan

    def group_of(self, param: torch.Tensor) -> dict[str, Any]:
        """The param group that holds ``param``."""
        self.plan(param)
        return self.param_groups[self._group_index[param]]

    def named_plans(self) -> list[tuple[torch.Tensor, ParamPlan]]:
        """``(param, plan)`` for every parameter in group order."""
        return [(p, self.plan(p)) for g in self.param_groups for p in g["params"]]

    # ---- dispatch helpers ---------------------------------------------------------------------
    def use_fused(self, param: torch.Tensor) -> bool:
        """Whether ``param`` steps through the Triton kernel (``fused=None``: CUDA tensors only)."""
        if self.fused is None:
            return param.is_cuda and param.dtype in FUSED_DTYPES and triton_supports([param])
        if self.fused:
            require_triton([param], f"{type(self).__name__}(fused=True)")
        return self.fused

    def touches_unselected(self) -> bool:
        """True when unselected weights change too (AdamW's ``decay_unselected``)."""
        return False

    def skips(self, plan: ParamPlan) -> bool:
        """A parameter that never changes: frozen, or masked with no selected weight."""
        return plan.kind == "frozen" or (plan.masked and plan.selected == 0 and not self.touches_unselected())

    def check_grad(self, plan: ParamPlan, param: torch.Tensor, grad: torch.Tensor) -> None:
        """Raise a clear error (naming the parameter) for gradients the optimizer cannot use."""
        owner = type(self).__name__
        if grad.is_sparse or grad.layout != torch.strided:
            raise TypeError(f"{owner}: parameter {plan.name!r} has a sparse gradient (not supported)")
        if grad.is_complex():
            raise TypeError(f"{owner}: parameter {plan.name!r} has a complex gradient (not supported)")
        if grad.shape != param.shape:
            raise UserError(
                f"{owner}: gradient of {plan.name!r} has shape {tuple(grad.shape)}, "
                f"parameter {tuple(param.shape)}"
            )
        if grad.device != param.device:
            raise UserError(
                f"{owner}: gradient of {plan.name!r} is on {grad.device}, the parameter on {param.device}"
            )
        if not param.is_contiguous():
            raise UserError(f"{owner}: parameter {plan.name!r} is no longer contiguous")

    def new_state_tensor(self, param: torch.Tensor, plan: ParamPlan) -> torch.Tensor:
        """A zero state tensor: compact (selected weights, 1-D) or param-shaped."""
        if plan.compact:
            return torch.zeros(plan.selected, dtype=self.state_dtype, device=param.device)
        return torch.zeros(param.shape, dtype=self.state_dtype, device=param.device)

    # ---- stepping ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One step for every parameter that has a gradient (frozen ones and masked ones without
        selected weights are skipped). Returns the closure's loss, if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            items = []
            for param in group["params"]:
                if param.grad is None:
                    continue
                plan = self.plan(param)
                if self.skips(plan):
                    continue
                items.append((param, plan, param.grad))
            if items:
                with self._local_items(items) as local:
                    for param, plan, grad in local:
                        self.check_grad(plan, param, grad)
                    self._step_items(group, local)
        return loss

    @contextlib.contextmanager
    def _local_items(self, items):
        """DTensor parameters as their local shards: ``(local param, plan, local grad)``, with the
        state entry of the DTensor visible under the local view while the step runs."""
        if self._shard_group is None:
            yield items
            return
        local, aliases = [], []
        for param, plan, grad in items:
            if _is_dtensor(param):
                view = param.to_local()
                self.state[view] = self.state[param]
                aliases.append(view)
                local.append((view, plan, _local(grad)))
            else:
                local.append((param, plan, grad))
        try:
            yield local
        finally:
            for view in aliases:
                del self.state[view]

    @torch.no_grad()
    def step_param(self, param: torch.Tensor, grad: torch.Tensor | None = None) -> None:
        """Step one parameter with ``grad`` (default ``param.grad``); used by
        :class:`~wagle.optim.StepInBackward` (one kernel launch per parameter)."""
        plan = self.plan(param)
        if _is_dtensor(param):
            raise UserError(f"{type(self).__name__}: step_param (StepInBackward) does not support DTensors")
        grad = param.grad if grad is None else grad
        if grad is None or self.skips(plan):
            return
        self.check_grad(plan, param, grad)
        self._step_items(self.group_of(param), [(param, plan, grad)])

    def _step_items(self, group: dict, items: list[tuple[torch.Tensor, ParamPlan, torch.Tensor]]) -> None:
        raise NotImplementedError

    def fused_buckets(
        self, items: list[tuple[torch.Tensor, ParamPlan, torch.Tensor]], extra_key=None
    ) -> tuple[dict[tuple, list], list]:
        """Split items into Triton buckets (one per masked/compact/dtypes/device combination, each
        launched as ``ceil(len / MAX_TENSORS_PER_LAUNCH)`` kernels) and torch-path items."""
        buckets: dict[tuple, list] = {}
        rest = []
        for item in items:
            param, plan, grad = item
            if not self.use_fused(param):
                rest.append(item)
                continue
            key = (plan.masked, plan.compact, param.dtype, grad.dtype, param.device)
            if extra_key is not None:
                key += (extra_key(item),)
            buckets.setdefault(key, []).append(item)
        return buckets, rest

    # ---- memory ---------------------------------------------------------------------------------
    def state_nbytes(self) -> int:
        """Bytes held by optimizer state tensors (moments/buffers and the 'step' scalars)."""
        total = 0
        for state in self.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
        return total

    def metadata_nbytes(self) -> int:
        """Bytes of compact-index metadata and device copies of mask bits the optimizer caches."""
        return sum(plan.metadata_nbytes() for plan in self._plans.values())

    # ---- state_dict ---------------------------------------------------------------------------
    def mask_digest(self) -> str:
        """Digest of the names, kinds, shapes and mask bits of this optimizer's parameters."""
        if self._digest is None:
            self._digest = mask_digest(plan for _, plan in self.named_plans())
            if self._shard_group is not None:  # the same on every rank: over all ranks' digests
                from wagle.distributed.optim import global_digest

                self._digest = global_digest(self._digest, self._shard_group)
        return self._digest

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state_dict plus a ``"wagle"`` entry identifying mask, layout and dtype (added by
        a post-hook that runs before any registered by the user)."""
        handle = self.register_state_dict_post_hook(_add_wagle_entry, prepend=True)
        try:
            return super().state_dict()
        finally:
            handle.remove()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` of an optimizer over the same parameters and mask.

        Raises :class:`~wagle.MaskMismatchError` for a state saved for another mask, ValueError for
        another optimizer class, layout or parameter groups, or a state tensor of the wrong size.
        Moments saved in another ``state_dtype`` are converted to this optimizer's (never to the
        parameter's dtype, as ``torch.optim.Optimizer`` would cast them). The checks run as a pre-hook
        after the user's pre-hooks; the state is placed by a post-hook before the user's post-hooks.
        """
        pre = self.register_load_state_dict_pre_hook(_checked_state)
        post = self.register_load_state_dict_post_hook(_place_state, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()

    def _check_meta(self, state_dict: Mapping[str, Any]) -> None:
        meta = state_dict.get("wagle") if isinstance(state_dict, Mapping) else None
        if meta is None:
            raise UserError(
                "state_dict: not saved by a wagle masked optimizer (no 'wagle' entry with the mask digest)"
            )
        if meta.get("optimizer") != type(self).__name__:
            raise UserError(f"state_dict: saved by {meta.get('optimizer')}, not {type(self).__name__}")
        if meta.get("mask_digest") != self.mask_digest():
            if meta.get("mask_fingerprint") != self.mask.fingerprint:
                raise MaskMismatchError(
                    "state_dict: it was saved for another mask (a mask over other parameter names/shapes)"
                )
            raise MaskMismatchError(
                "state_dict: it was saved for another mask or other parameters (names, shapes or selected "
                "weights differ)"
            )
        self._check_layouts(meta)

    def _check_layouts(self, meta: Mapping[str, Any]) -> None:
        """Match the saved per-parameter layouts: an ``"auto"`` optimizer adopts them (the state then
        loads identically wherever it was resolved), an explicit layout must equal them. States saved
        before per-parameter layouts were recorded carry one layout for every masked parameter."""
        saved_layout = meta.get("state_layout")
        if saved_layout not in STATE_LAYOUTS:
            raise UserError(f"state_dict: unknown state_layout {saved_layout!r}")
        masked = [plan for _, plan in self.named_plans() if plan.masked]
        saved = meta.get("layouts")
        if saved is None:
            if saved_layout == "auto":
                raise UserError("state_dict: saved with state_layout='auto' but without its resolved layouts")
            saved = {plan.name: saved_layout for plan in masked}
        if self.state_layout == "auto":
            for plan in masked:
                layout = saved.get(plan.name)
                if layout not in ("dense", "compact"):
                    raise UserError(f"state_dict: no saved state layout for {plan.name!r}")
                if layout == "compact" and self.touches_unselected():
                    raise UserError(
                        f"state_dict: {plan.name!r} was saved with compact state; decay_unselected=True "
                        "needs dense state"
                    )
            for plan in masked:
                plan.layout = saved[plan.name]
            return
        differ = [plan.name for plan in masked if saved.get(plan.name) != plan.layout]
        if differ:
            raise UserError(
                f"state_dict: saved with state_layout={saved_layout!r} ({differ[0]!r}: "
                f"{saved.get(differ[0])!r}), this optimizer uses {self.state_layout!r}"
            )

    def _restored_value(self, param: torch.Tensor, key: str, value: Any) -> Any:
        """A saved state value as this optimizer keeps it: ``step`` a float32 CPU tensor, moments in
        ``state_dtype`` on the parameter's device in the layout's shape (sizes checked)."""
        plan = self.plan(param)
        if key == "step":
            if isinstance(value, torch.Tensor):
                return value.detach().to(dtype=torch.float32, device="cpu").clone()
            return torch.tensor(float(value), dtype=torch.float32)
        if not (isinstance(value, torch.Tensor) and key in self.state_tensor_keys):
            return value
        expected = plan.state_numel()
        if value.numel() != expected:
            raise UserError(
                f"state_dict: {key!r} of {plan.name!r} has {value.numel()} elements, expected "
                f"{expected} ({plan.layout} layout)"
            )
        shape = (expected,) if plan.compact else plan.shape
        restored = value.detach().to(device=param.device, dtype=self.state_dtype).reshape(shape)
        return restored.clone() if restored.data_ptr() == value.data_ptr() else restored


@dataclass(frozen=True)
class _Placed:
    """A state value already converted by the masked optimizer; ``Optimizer.load_state_dict`` passes
    objects that are neither tensors nor containers through unchanged (it would cast tensors to the
    parameter's dtype)."""

    value: Any


def _add_wagle_entry(optimizer: MaskedOptimizer, state: dict[str, Any]) -> dict[str, Any]:
    state["wagle"] = {
        "version": STATE_DICT_VERSION,
        "optimizer": type(optimizer).__name__,
        "mask_fingerprint": optimizer.mask.fingerprint,
        "mask_digest": optimizer.mask_digest(),
        "state_layout": optimizer.state_layout,
        "layouts": optimizer.layouts(),
        "state_dtype": str(optimizer.state_dtype).removeprefix("torch."),
    }
    return state


def _checked_state(optimizer: MaskedOptimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Load pre-hook: validate against the mask and parameters, convert every state value."""
    optimizer._check_meta(state_dict)
    saved_groups = state_dict["param_groups"]
    groups = optimizer.param_groups
    if len(saved_groups) != len(groups) or any(
        len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, groups, strict=True)
    ):
        raise UserError("state_dict: parameter groups differ from this optimizer's")
    index_to_param = {}
    for saved, group in zip(saved_groups, groups, strict=True):
        if "param_names" in saved and list(saved["param_names"]) != list(group["param_names"]):
            raise UserError("state_dict: parameter names differ from this optimizer's")
        index_to_param.update(zip(saved["params"], group["params"], strict=True))
    state = {}
    for index, values in state_dict["state"].items():
        if index not in index_to_param:
            raise UserError(f"state_dict: state for unknown parameter index {index}")
        param = index_to_param[index]
        state[index] = {
            key: _Placed(optimizer._restored_value(param, key, value)) for key, value in values.items()
        }
    return {**state_dict, "state": state}


def _place_state(optimizer: MaskedOptimizer) -> None:
    """Load post-hook: unwrap the values :func:`_checked_state` converted."""
    for values in optimizer.state.values():
        for key, value in values.items():
            if isinstance(value, _Placed):
                values[key] = value.value
