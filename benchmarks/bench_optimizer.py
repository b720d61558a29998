"""Masked AdamW step benchmark: time, bytes moved, GB/s vs copy bandwidth, and optimizer-state memory.

Side by side in one run, on the same synthetic parameters (Llama-2 shapes, random, never zeros):

* ``masked-dense`` / ``masked-compact`` - :class:`wagle.MaskedAdamW` (fused Triton kernel on CUDA,
  the torch path on CPU) with param-shaped or selected-only moments;
* ``torch-fused+mul`` - ``grad.mul_(bool mask)`` then ``torch.optim.AdamW(fused=True)`` (CUDA only);
* ``torch-foreach+mul`` - the same with ``foreach=True``.

Bytes per step (the model the GB/s figures use): masked = N/8 (mask bits) + selected * (3 * param
bytes + 4 * state bytes); baseline = N * (2 * grad bytes + 1) for the mask multiply + N * 7 * param
bytes for AdamW with param-dtype state (torch keeps moments in the parameter dtype).

    python benchmarks/bench_optimizer.py                       # CPU, scaled-down shapes
    python benchmarks/bench_optimizer.py --shapes llama2-7b    # GPU
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPE_SETS, copy_bandwidth, environment, results_path, time_call, write_json  # noqa: E402

from wagle import MaskedAdamW, WeightMask  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_params(shapes, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    params = {}
    for name, shape in shapes.items():
        p = torch.randn(shape, generator=g, device=device, dtype=dtype).mul_(0.02)
        p.grad = torch.randn(shape, generator=g, device=device, dtype=dtype).mul_(1e-3)
        params[name] = p
    return params


def make_mask(shapes, ratio, device, seed=1):
    g = torch.Generator(device=device).manual_seed(seed)
    bools = {n: torch.rand(s, generator=g, device=device) < ratio for n, s in shapes.items()}
    return WeightMask.from_dict(bools), bools


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", choices=sorted(SHAPE_SETS), default=None)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument("--ratios", default="0.1,0.5,0.95")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    shapes_name = args.shapes or ("llama2-7b" if cuda else "llama2-5m")
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    shapes = SHAPE_SETS[shapes_name]()
    numel = sum(math.prod(s) for s in shapes.values())
    elem = torch.empty((), dtype=dtype).element_size()
    info = environment()
    bandwidth = copy_bandwidth(args.device, nbytes=1 << 30 if cuda else 1 << 28)
    rows = []
    params = make_params(shapes, dtype, args.device)
    named = list(params.items())
    for ratio in (float(r) for r in args.ratios.split(",")):
        mask, bools = make_mask(shapes, ratio, args.device)
        selected = mask.num_selected
        for layout in ("dense", "compact"):
            opt = MaskedAdamW(named, mask, lr=1e-5, weight_decay=0.1, state_layout=layout, fused=cuda or None)
            opt.step()  # allocate state / compile
            seconds = time_call(opt.step, args.device, repeats=args.repeats)
            moved = numel / 8 + selected * (3 * elem + 4 * 4)
            rows.append(
                {
                    "method": f"masked-{layout}",
                    "ratio": ratio,
                    "seconds": seconds,
                    "bytes": moved,
                    "GBps": moved / seconds / 1e9,
                    "state_bytes": opt.state_nbytes(),
                    "kernel": "triton" if cuda else "torch path",
                }
            )
            del opt
        variants = (["fused"] if cuda else []) + ["foreach"]
        for variant in variants:
            base = torch.optim.AdamW([p for _, p in named], lr=1e-5, weight_decay=0.1, **{variant: True})
            grads = {n: p.grad.clone() for n, p in named}

            def step(base=base, bools=bools):
                for n, p in named:
                    p.grad.mul_(bools[n])
                base.step()

            step()
            seconds = time_call(step, args.device, repeats=args.repeats)
            moved = numel * (2 * elem + 1) + numel * 7 * elem
            state = sum(
                t.numel() * t.element_size()
                for s in base.state.values()
                for t in s.values()
                if isinstance(t, torch.Tensor)
            )
            rows.append(
                {
                    "method": f"torch-{variant}+mul",
                    "ratio": ratio,
                    "seconds": seconds,
                    "bytes": moved,
                    "GBps": moved / seconds / 1e9,
                    "state_bytes": state,
                }
            )
            for n, p in named:
                p.grad.copy_(grads[n])
    payload = {
        "benchmark": "masked AdamW step",
        "environment": info,
        "config": {"shapes": shapes_name, "numel": numel, "dtype": str(dtype), "device": args.device},
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "results": rows,
    }
    path = args.out or results_path(f"optimizer-{shapes_name}", info)
    write_json(path, payload)
    print(
        f"{shapes_name}: {numel / 1e6:.1f}M params, {dtype}, {info['device']}; copy bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s"
    )
    print(f"{'method':<20} {'ratio':>5} {'step':>10} {'GB/s':>8} {'% copy':>7} {'state MB':>10}")
    for r in rows:
        print(
            f"{r['method']:<20} {r['ratio']:>5} {r['seconds'] * 1e3:>8.2f}ms {r['GBps']:>8.1f} "
            f"{100 * r['GBps'] * 1e9 / bandwidth:>6.0f}% {r['state_bytes'] / 2**20:>10.1f}"
        )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
