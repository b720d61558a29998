"""Counted memory traffic of the mask pipeline and the masked optimizers, without a GPU.

The kernels run in Triton's interpreter (``TRITON_INTERPRET=1``) with its memory operations
instrumented: every ``tl.load`` / ``tl.store`` / atomic of every program counts the distinct 32-byte
sectors its active lanes touch (``32 * #unique(address // 32)`` bytes, the unit a GPU's memory system
moves), and the bytes its lanes asked for (``lanes * element size``: a lane-redundant load such as one
mask byte read by 8 lanes shows up as requested >> sector bytes). Torch operations around the kernels
are counted with a ``TorchDispatchMode``: each non-view aten op reads its tensor inputs and writes its
tensor outputs (``numel * element size`` each; allocations without a fill count nothing). Atomics are
performed in the GPU's L2 cache, so a launch's atomics count each distinct sector they touch once,
read and written (a histogram's bins: once per launch, not once per program). Host syncs
are the operations that wait for the device on a GPU: reading a scalar (``.item()``, ``int()``,
``.tolist()``), a device-to-host copy, and ops with data-dependent output sizes (``nonzero``,
boolean indexing). Launches are kernel launches (each grid) plus non-view torch ops.

The figures are ratios to the floor: for a mask, one read of each input the score method reads plus
the 1-bit mask write; for an optimizer step, its layout's bytes (see ``bench_optimizer.py``).

This hooks interpreter internals (``InterpreterBuilder.create_masked_load`` & co.), so it is pinned to
the Triton versions in :data:`SUPPORTED_TRITON`; :func:`supported` says why it cannot run elsewhere.

    TRITON_INTERPRET=1 python benchmarks/traffic.py            # table + results/traffic-...json
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

SUPPORTED_TRITON = ("3.9",)  # major.minor versions whose interpreter internals the counters hook
SECTOR = 32


def supported() -> str | None:
    """None when counting can run here, else the reason it cannot."""
    try:
        import triton
    except ImportError:
        return "triton is not installed"
    version = ".".join(triton.__version__.split(".")[:2])
    if version not in SUPPORTED_TRITON:
        return (
            f"traffic counting hooks the interpreter internals of Triton {SUPPORTED_TRITON}; "
            f"found {triton.__version__}"
        )
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "traffic counting needs TRITON_INTERPRET=1 set before triton is imported"
    return None


@dataclass
class Traffic:
    """Counted traffic of one measured region (bytes, except the counts)."""

    kernel_read: int = 0
    kernel_write: int = 0
    kernel_atomic: int = 0  # distinct sectors of a launch's atomics (performed in L2: read + written once)
    kernel_requested: int = 0  # bytes the lanes of loads/stores/atomics asked for
    atomic_ops: int = 0  # active atomic lanes
    torch_read: int = 0
    torch_write: int = 0
    kernel_launches: int = 0
    torch_ops: int = 0
    host_syncs: int = 0
    kernels: dict[str, int] = field(default_factory=dict)  # launches per kernel name
    torch_by_op: dict[str, int] = field(default_factory=dict)  # bytes per aten op
    sync_ops: dict[str, int] = field(default_factory=dict)

    @property
    def kernel_bytes(self) -> int:
        return self.kernel_read + self.kernel_write + 2 * self.kernel_atomic

    @property
    def torch_bytes(self) -> int:
        return self.torch_read + self.torch_write

    @property
    def total_bytes(self) -> int:
        return self.kernel_bytes + self.torch_bytes

    @property
    def launches(self) -> int:
        return self.kernel_launches + self.torch_ops


_FACTORIES = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}
_SYNC_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "_assert_async",
    "unique_consecutive",
    "_unique2",
}


def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


class _TorchCounter(TorchDispatchMode):
    def __init__(self, traffic: Traffic, active: list[bool]):
        super().__init__()
        self.traffic = traffic
        self.active = active

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.active[0]:
            return out
        name = func.overloadpacket.__name__
        if name in _SYNC_OPS or (
            name == "index"
            and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in (args[1] if len(args) > 1 else [])
            )
        ):
            self.traffic.host_syncs += 1
            self.traffic.sync_ops[name] = self.traffic.sync_ops.get(name, 0) + 1
        if _is_view(func) or name in _FACTORIES or name == "_local_scalar_dense":
            return out
        self.traffic.torch_ops += 1
        read = 0
        if name not in ("fill_", "zero_", "fill", "zero"):  # a fill writes without reading
            read = sum(_tensor_bytes(a) for a in args) + sum(_tensor_bytes(v) for v in kwargs.values())
        written = _tensor_bytes(out)
        self.traffic.torch_read += read
        self.traffic.torch_write += written
        self.traffic.torch_by_op[name] = self.traffic.torch_by_op.get(name, 0) + read + written
        return out


def _sectors(addresses: np.ndarray, size: int) -> int:
    if addresses.size == 0:
        return 0
    first = addresses // SECTOR
    last = (addresses + (size - 1)) // SECTOR
    if np.array_equal(first, last):
        return int(np.unique(first).size)
    return int(np.unique(np.concatenate([first, last])).size)


@contextlib.contextmanager
def count_traffic():
    """Count the traffic of everything run inside (yields a :class:`Traffic` filled on exit)."""
    reason = supported()
    if reason:
        raise RuntimeError(reason)
    from triton.runtime import interpreter as itp

    traffic = Traffic()
    active = [True]
    builder = itp.interpreter_builder
    orig_load = builder.create_masked_load
    orig_store = builder.create_masked_store
    orig_rmw = builder.create_atomic_rmw
    orig_cas = builder.create_atomic_cas
    orig_call = itp.GridExecutor.__call__
    orig_item, orig_tolist, orig_cpu = torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu

    def element_size(ptrs) -> int:
        return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)

    atomic_sectors: list[np.ndarray] = []  # of the running launch

    def account(kind, ptrs, mask):
        size = element_size(ptrs)
        addresses = np.asarray(ptrs.data).reshape(-1)
        if mask is not None:
            addresses = addresses[np.asarray(mask.data).reshape(-1).astype(bool)]
        traffic.kernel_requested += int(addresses.size) * size
        if kind == "kernel_atomic":  # resolved in L2: each distinct sector of a launch moves once
            atomic_sectors.append(np.unique(addresses.astype(np.uint64) // SECTOR))
            return int(addresses.size)
        sector_bytes = SECTOR * _sectors(addresses.astype(np.uint64), size)
        setattr(traffic, kind, getattr(traffic, kind) + sector_bytes)
        return int(addresses.size)

    def load(ptrs, mask, other, cache_policy, is_volatile):
        account("kernel_read", ptrs, mask)
        return orig_load(ptrs, mask, other, cache_policy, is_volatile)

    def store(ptrs, value, mask, cache_policy):
        account("kernel_write", ptrs, mask)
        return orig_store(ptrs, value, mask, cache_policy)

    def rmw(op, ptr, val, mask, sem, scope):
        traffic.atomic_ops += account("kernel_atomic", ptr, mask)
        return orig_rmw(op, ptr, val, mask, sem, scope)

    def cas(ptr, cmp, val, sem, scope):
        traffic.atomic_ops += account("kernel_atomic", ptr, None)
        return orig_cas(ptr, cmp, val, sem, scope)

    def call(self, *args, **kwargs):
        traffic.kernel_launches += 1
        name = getattr(self.fn, "__name__", "kernel")
        traffic.kernels[name] = traffic.kernels.get(name, 0) + 1
        was, active[0] = active[0], False  # the interpreter's own host copies are no device traffic
        atomic_sectors.clear()
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            active[0] = was
            if atomic_sectors:
                traffic.kernel_atomic += SECTOR * int(np.unique(np.concatenate(atomic_sectors)).size)
            atomic_sectors.clear()

    def sync(name, orig):
        def wrapped(self, *args, **kwargs):
            if active[0]:
                traffic.host_syncs += 1
                traffic.sync_ops[name] = traffic.sync_ops.get(name, 0) + 1
            was, active[0] = active[0], False  # counted here, not again as _local_scalar_dense
            try:
                return orig(self, *args, **kwargs)
            finally:
                active[0] = was

        return wrapped

    builder.create_masked_load = load
    builder.create_masked_store = store
    builder.create_atomic_rmw = rmw
    builder.create_atomic_cas = cas
    itp.GridExecutor.__call__ = call
    torch.Tensor.item = sync("item", orig_item)
    torch.Tensor.tolist = sync("tolist", orig_tolist)
    torch.Tensor.cpu = sync("cpu", orig_cpu)
    try:
        with _TorchCounter(traffic, active):
            yield traffic
    finally:
        builder.create_masked_load = orig_load
        builder.create_masked_store = orig_store
        builder.create_atomic_rmw = orig_rmw
        builder.create_atomic_cas = orig_cas
        itp.GridExecutor.__call__ = orig_call
        torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu = orig_item, orig_tolist, orig_cpu


# ---------------------------------------------------------------------------------------------------
# workloads
# ---------------------------------------------------------------------------------------------------
def scaled_llama_shapes(hidden: int = 64, intermediate: int = 172, vocab: int = 256, layers: int = 1):
    """A scaled-down Llama-2 layer stack in ``named_parameters()`` order (odd sizes included)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import llama_shapes

    return llama_shapes(vocab=vocab, hidden=hidden, intermediate=intermediate, layers=layers)


def mask_inputs(shapes, case: str, seed: int = 0, dtype=torch.bfloat16):
    """bf16 weights and gradients; ``tie_heavy``: 30% of embedding/lm_head rows (and of every other
    tensor's rows) get an exactly-zero forget gradient, the huge tie of exactly-zero scores."""
    g = torch.Generator().manual_seed(seed)
    params, gf, gr = {}, {}, {}
    for name, shape in shapes.items():
        w = torch.randn(shape, generator=g)
        f = torch.randn(shape, generator=g) * 1e-3
        r = torch.randn(shape, generator=g) * 1e-9
        if case == "tie_heavy":
            rows = shape[0]
            zero = torch.rand(rows, generator=g) < 0.3
            f[zero] = 0.0
        params[name], gf[name], gr[name] = (t.to(dtype) for t in (w, f, r))
    return params, gf, gr


def mask_floor(params, method: str = "wagle") -> int:
    """Bytes of one read of each input the method reads plus the 1-bit mask (rounded up per tensor)."""
    from wagle_kernels.scores import get_method

    reads = sum(get_method(method).reads)
    return sum(reads * w.numel() * w.element_size() + (w.numel() + 7) // 8 for w in params.values())


def measure_mask(shapes, case: str, ratio: float, method: str = "wagle") -> dict:
    from wagle.attribution import mask_from_gradients

    params, gf, gr = mask_inputs(shapes, case)
    n = sum(w.numel() for w in params.values())
    with count_traffic() as traffic:
        mask, stats = mask_from_gradients(
            params, gf, gr, ratio=ratio, method=method, backend="triton", return_stats=True
        )
    kernels_only = traffic.kernel_bytes
    floor = mask_floor(params, method)
    return {
        "workload": "mask",
        "case": case,
        "ratio": ratio,
        "method": method,
        "numel": n,
        "tensors": len(params),
        "selected": mask.num_selected,
        "floor_bytes_per_weight": floor / n,
        "kernel_bytes_per_weight": kernels_only / n,
        "total_bytes_per_weight": traffic.total_bytes / n,
        "kernel_x_floor": kernels_only / floor,
        "total_x_floor": traffic.total_bytes / floor,
        "input_passes": stats.input_passes,
        "compacted": stats.compacted,
        **_counts(traffic),
    }


def measure_optimizer(shapes, layout: str, ratio: float, dtype=torch.bfloat16) -> dict:
    """One masked AdamW step (after a first step that allocates the state) with ``layout`` state
    (``"auto"``: each parameter's resolved layout, whose floor is summed per parameter)."""
    from wagle.mask import WeightMask
    from wagle.optim import MaskedAdamW

    g = torch.Generator().manual_seed(1)
    params = {n: torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for n, s in shapes.items()}
    selected = {n: torch.rand(s, generator=g) < ratio for n, s in shapes.items()}
    mask = WeightMask.from_dict(selected)
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=g).to(dtype)
    opt = MaskedAdamW(list(params.items()), mask, lr=1e-3, weight_decay=0.1, state_layout=layout, fused=True)
    opt.step()
    with count_traffic() as traffic:
        opt.step()
    n = sum(p.numel() for p in params.values())
    k = mask.num_selected
    e, s = 2 if dtype == torch.bfloat16 else 4, 4
    layouts = opt.layouts()
    floor = sum(
        p.numel() * 3 * e
        + (mask.selected(name) if layouts[name] == "compact" else p.numel()) * 4 * s
        + (p.numel() + 7) // 8
        for name, p in params.items()
    )
    return {
        "workload": "adamw",
        "case": layout,
        "ratio": ratio,
        "numel": n,
        "tensors": len(params),
        "selected": k,
        "layouts": dict(Counter(layouts.values())),
        "state_bytes": opt.state_nbytes(),
        "metadata_bytes": opt.metadata_nbytes(),
        "floor_bytes_per_weight": floor / n,
        "kernel_bytes_per_weight": traffic.kernel_bytes / n,
        "total_bytes_per_weight": traffic.total_bytes / n,
        "kernel_x_floor": traffic.kernel_bytes / floor,
        "total_x_floor": traffic.total_bytes / floor,
        "requested_x_sector": traffic.kernel_requested / max(1, traffic.kernel_bytes),
        **_counts(traffic),
    }


def _counts(traffic: Traffic) -> dict:
    return {
        "kernel_launches": traffic.kernel_launches,
        "torch_ops": traffic.torch_ops,
        "host_syncs": traffic.host_syncs,
        "atomic_ops": traffic.atomic_ops,
        "kernels": dict(traffic.kernels),
        "sync_ops": dict(traffic.sync_ops),
        "torch_bytes_by_op": dict(sorted(traffic.torch_by_op.items(), key=lambda kv: -kv[1])),
        "bytes": {k: v for k, v in asdict(traffic).items() if isinstance(v, int)},
    }


RATIOS = (0.1, 0.5, 0.95)


def launches_per_selection(layers: int = 32) -> dict:
    """Kernel launches, torch ops and host syncs of one selection (common and tie-heavy case, ratio
    0.5 / 0.95) and of one masked AdamW step over Llama-2-7B's 291 tensors (the tensor count of
    ``layers`` decoder layers, each tensor shrunk to a few hundred weights: launches depend on the
    tensor count, not on the sizes)."""
    shapes = scaled_llama_shapes(hidden=16, intermediate=43, vocab=64, layers=layers)
    out = {"tensors": len(shapes)}
    for case, ratio in (("common", 0.5), ("tie_heavy", 0.95)):
        row = measure_mask(shapes, case, ratio)
        out[f"mask_{case}"] = {k: row[k] for k in ("kernel_launches", "torch_ops", "host_syncs", "kernels")}
    row = measure_optimizer(shapes, "compact", 0.5)
    out["adamw_compact"] = {k: row[k] for k in ("kernel_launches", "torch_ops", "host_syncs")}
    return out


def run_all(shapes=None) -> list[dict]:
    shapes = shapes or scaled_llama_shapes()
    rows = [measure_mask(shapes, case, r) for case in ("common", "tie_heavy") for r in RATIOS]
    rows += [measure_optimizer(shapes, layout, r) for layout in ("dense", "compact", "auto") for r in RATIOS]
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| workload | case | ratio | floor B/w | kernels B/w | total B/w | total / floor | launches "
        "| syncs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['case']} | {r['ratio']} | {r['floor_bytes_per_weight']:.3f} | "
            f"{r['kernel_bytes_per_weight']:.3f} | {r['total_bytes_per_weight']:.3f} | "
            f"{r['total_x_floor']:.2f}x | {r['kernel_launches']} + {r['torch_ops']} torch "
            f"| {r['host_syncs']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="results JSON path (default benchmarks/results/...)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the scaled Llama-2 layer")
    args = parser.parse_args(argv)
    reason = supported()
    if reason:
        print(f"traffic counting skipped: {reason}")
        return 2
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import environment, results_path, write_json

    shapes = scaled_llama_shapes(
        hidden=args.hidden, intermediate=round(args.hidden * 2.6875), vocab=4 * args.hidden
    )
    info = environment()  # before the run: the commit and tree state that ran
    info["device"] = "interpreter"
    rows = run_all(shapes)
    launches = launches_per_selection()
    path = args.out or results_path("traffic-llama2-scaled", info)
    write_json(
        path,
        {
            "environment": info,
            "config": {
                "shapes": (
                    f"one Llama-2 decoder layer + embeddings + lm_head, hidden {args.hidden}, "
                    f"intermediate {round(args.hidden * 2.6875)}, vocab {4 * args.hidden}"
                ),
                "numel": sum(math.prod(s) for s in shapes.values()),
                "dtype": "bfloat16 weights and gradients; fp32 optimizer state",
                "counting": "Triton interpreter, 32-byte sectors; torch ops via TorchDispatchMode",
            },
            "results": rows,
        },
    )
    launches_path = os.path.join(
        os.path.dirname(path),
        os.path.basename(path).replace("traffic-llama2-scaled", "traffic-llama2-7b-launches"),
    )
    write_json(
        launches_path,
        {
            "environment": info,
            "config": {
                "shapes": "Llama-2-7B tensor count (291), each tensor shrunk",
                "note": "host_syncs counts .item()/.tolist()/.cpu() and data-dependent-size ops; on a "
                "GPU the optimizer's per-tensor step-counter reads are CPU scalars and do not wait for the "
                "device",
            },
            "results": launches,
        },
    )
    print(format_table(rows))
    print(f"Llama-2-7B tensor count ({launches['tensors']}): {launches}")
    print(f"results: {path}, {launches_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
