"""Masked AdamW step benchmark: time, bytes moved, GB/s vs copy bandwidth, and optimizer-state memory.

Side by side in one run, on the same synthetic parameters (Llama-2 shapes, random values, random masks
at each ratio):

* ``masked-dense`` / ``masked-compact`` - :class:`wagle.MaskedAdamW` (the fused Triton kernel on CUDA,
  the torch path on CPU) with param-shaped or selected-only moments, per ``--state-dtypes``;
* ``torch-fused+mul`` - ``grad.mul_(bool mask)`` then ``torch.optim.AdamW(fused=True)`` (CUDA only),
  the reference implementation's procedure;
* ``torch-foreach+mul`` - the same with ``foreach=True``.

Bytes per step (the traffic model the GB/s figures use; ``e`` = param/grad bytes, ``s`` = state bytes,
``A`` = weights in kernel blocks of 2048 that hold at least one selected weight, ``k`` = selected):

* masked-dense:   ``N/8`` (mask bits) ``+ A * (3e + 4s)``  (read p, g, m, v; write p, m, v);
* masked-compact: ``N/8 + A * 3e + k * 4s``                (moments of the selected weights only);
* torch +mul:     ``N * (2e + 1)`` (grad.mul_ by a bool mask) ``+ N * 7e`` (AdamW, state in param dtype).

``% copy`` compares the achieved GB/s with a device copy (bytes read + written) measured in the same
run. Step times follow the benchmarks' convention (``common.time_stats``): minimum and median over
``--repeats`` steps after a warm-up step are recorded, the GB/s and table figures use the minimum.
On CPU the masked rows run the torch reference path, so their GB/s says little about the kernel.

    python benchmarks/bench_optimizer.py                       # CPU, scaled-down shapes (llama2-5m)
    python benchmarks/bench_optimizer.py --shapes llama2-7b    # GPU (bf16 params; fp32 and bf16 state)
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    SHAPE_SETS,
    copy_bandwidth,
    environment,
    results_path,
    synchronize,
    time_stats,
    write_json,
)

import wagle.optim.adamw  # noqa: E402
from wagle import MaskedAdamW, WeightMask  # noqa: E402
from wagle_kernels.bitpack import popcount  # noqa: E402
from wagle_kernels.mask_bits import STATE_BLOCK, block_prefix  # noqa: E402
from wagle_kernels.masked_adamw import masked_adamw_step_triton  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_params(shapes, dtype, device, seed=0) -> dict[str, torch.Tensor]:
    """Random parameters (scale 0.02) with random gradients (scale 1e-3) attached."""
    g = torch.Generator(device=device).manual_seed(seed)
    params = {}
    for name, shape in shapes.items():
        p = torch.randn(shape, generator=g, device=device, dtype=dtype).mul_(0.02)
        p.grad = torch.randn(shape, generator=g, device=device, dtype=dtype).mul_(1e-3)
        params[name] = p
    return params


def make_mask(shapes, ratio, device, seed=1) -> WeightMask:
    """A random mask selecting each weight with probability ``ratio`` (bits kept on ``device``)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return WeightMask.from_dict(
        {n: torch.rand(s, generator=g, device=device) < ratio for n, s in shapes.items()}
    )


def active_weights(mask: WeightMask) -> int:
    """Weights in kernel blocks (STATE_BLOCK) that hold at least one selected weight."""
    total = 0
    for name in mask:
        numel = math.prod(mask.shape(name))
        if numel == 0:
            continue
        prefix = block_prefix(mask.packed(name), numel).cpu()
        counts = torch.diff(prefix, append=torch.tensor([popcount(mask.packed(name))]))
        sizes = torch.full_like(counts, STATE_BLOCK)
        sizes[-1] = numel - STATE_BLOCK * (counts.numel() - 1)
        total += int(sizes[counts > 0].sum())
    return total


def release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def timed_row(step, device, repeats) -> tuple[dict | None, str | None]:
    """Step times after a warm-up step (compiles kernels, allocates state): ``{"min", "median"}`` in
    seconds (the GB/s figures use the minimum: on a shared machine it is the least disturbed run);
    None and the error on out-of-memory."""
    try:
        step()
        synchronize(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            synchronize(device)
            times.append(time.perf_counter() - start)
    except torch.cuda.OutOfMemoryError as error:
        return None, f"out of memory: {str(error).splitlines()[0]}"
    return time_stats(times), None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shapes",
        choices=sorted(SHAPE_SETS),
        default=None,
        help="default: llama2-7b on CUDA, llama2-5m on CPU",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="param dtype (bf16 on CUDA, fp32 on CPU)"
    )
    parser.add_argument(
        "--state-dtypes", default=None, help="moment dtypes, e.g. fp32,bf16 (CUDA default) or fp32"
    )
    parser.add_argument("--ratios", default="0.1,0.5,0.95")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--num-warps", default="8", help="comma list: time the fused kernel with each (CUDA), e.g. 4,8,16"
    )
    parser.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/optimizer-...json)"
    )
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    shapes_name = args.shapes or ("llama2-7b" if cuda else "llama2-5m")
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    state_dtypes = [DTYPES[s] for s in (args.state_dtypes or ("fp32,bf16" if cuda else "fp32")).split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]
    warp_options = [int(w) for w in args.num_warps.split(",")] if cuda else [8]
    shapes = SHAPE_SETS[shapes_name]()
    numel = sum(math.prod(s) for s in shapes.values())
    elem = torch.empty((), dtype=dtype).element_size()
    info = environment()
    bandwidth = copy_bandwidth(args.device, nbytes=1 << 30 if cuda else 1 << 28)
    release(args.device)
    params = make_params(shapes, dtype, args.device)
    named = list(params.items())
    rows = []

    def add(method, ratio, times, moved, error=None, **extra):
        seconds = times["min"] if times else None
        row = {"method": method, "ratio": ratio, "seconds": seconds, "bytes": moved}
        row["median_seconds"] = times["median"] if times else None
        row["GBps"] = moved / seconds / 1e9 if seconds else None
        row["pct_copy"] = 100 * moved / seconds / bandwidth if seconds else None
        row.update(extra)
        if error:
            row["error"] = error
        rows.append(row)

    for ratio in ratios:
        mask = make_mask(shapes, ratio, args.device)
        selected, active = mask.num_selected, active_weights(mask)
        for state_dtype in state_dtypes:
            state = torch.empty((), dtype=state_dtype).element_size()
            for layout, warps in [(lay, w) for lay in ("dense", "compact") for w in warp_options]:
                # the optimizer calls the kernel launcher through its module: time it with each num_warps
                wagle.optim.adamw.masked_adamw_step_triton = functools.partial(
                    masked_adamw_step_triton, num_warps=warps
                )
                opt = MaskedAdamW(
                    named, mask, lr=1e-5, weight_decay=0.1, state_layout=layout, state_dtype=state_dtype
                )
                times, error = timed_row(opt.step, args.device, args.repeats)
                if layout == "dense":
                    moved = numel / 8 + active * (3 * elem + 4 * state)
                else:
                    moved = numel / 8 + active * 3 * elem + selected * 4 * state
                add(
                    f"masked-{layout}",
                    ratio,
                    times,
                    moved,
                    error,
                    state_dtype=str(state_dtype).removeprefix("torch."),
                    state_bytes=opt.state_nbytes(),
                    metadata_bytes=opt.metadata_nbytes(),
                    launches=opt.launches,
                    num_warps=warps if cuda else None,
                    path="triton" if cuda else "torch",
                    selected=selected,
                    active=active,
                )
                del opt
                release(args.device)
        bools = {n: mask[n].to(args.device) for n in shapes}
        for variant in (["fused"] if cuda else []) + ["foreach"]:
            base = torch.optim.AdamW([p for _, p in named], lr=1e-5, weight_decay=0.1, **{variant: True})

            def step(base=base, bools=bools):
                for n, p in named:
                    p.grad.mul_(bools[n])
                base.step()

            times, error = timed_row(step, args.device, args.repeats)
            state_bytes = sum(
                t.numel() * t.element_size()
                for s in base.state.values()
                for t in s.values()
                if isinstance(t, torch.Tensor)
            )
            add(
                f"torch-{variant}+mul",
                ratio,
                times,
                numel * (2 * elem + 1) + numel * 7 * elem,
                error,
                state_dtype=str(dtype).removeprefix("torch."),
                state_bytes=state_bytes,
                mask_bytes=numel,
            )
            del base
            release(args.device)
        del bools, mask
        release(args.device)

    payload = {
        "benchmark": "masked AdamW step",
        "environment": info,
        "config": {
            "shapes": shapes_name,
            "numel": numel,
            "tensors": len(shapes),
            "dtype": str(dtype).removeprefix("torch."),
            "device": args.device,
            "repeats": args.repeats,
            "cpu_threads": torch.get_num_threads(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "bytes_model": __doc__.split("Bytes per step")[1].split("``% copy``")[0].strip(),
        "results": rows,
    }
    path = args.out or results_path(f"optimizer-{shapes_name}", info)
    write_json(path, payload)
    print(
        f"{shapes_name}: {numel / 1e6:.1f}M weights in {len(shapes)} tensors, {dtype}, {info['device']}; "
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    print(
        f"{'method':<18} {'state':>8} {'ratio':>5} {'step ms':>9} {'GB/s':>7} {'% copy':>6} "
        f"{'state MB':>9} {'launch':>6} {'warps':>5}"
    )
    for r in rows:
        if r["seconds"] is None:
            print(f"{r['method']:<18} {r.get('state_dtype', ''):>8} {r['ratio']:>5} {r['error']}")
            continue
        print(
            f"{r['method']:<18} {r.get('state_dtype', ''):>8} {r['ratio']:>5} {r['seconds'] * 1e3:>9.2f} "
            f"{r['GBps']:>7.1f} {r['pct_copy']:>6.0f} {r['state_bytes'] / 2**20:>9.1f} "
            f"{r.get('launches', ''):>6} {r.get('num_warps') or '':>5}"
        )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
