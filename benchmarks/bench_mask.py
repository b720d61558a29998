"""End-to-end mask generation benchmark: score + exact global top-k + bit-packed mask.

Compares, in one run and on the same synthetic tensors (Llama-2 parameter shapes, random, bf16 by
default):

* ``triton``    - wagle's kernels (CUDA; on CPU only with ``--interpreter``, which is slow);
* ``torch``     - wagle's torch reference path;
* ``reference`` - the reference implementation's procedure: eager per-tensor scores, one concatenated
  vector on the CPU, ``argsort`` (positions) + ``argsort`` (ranks), mask = rank above the cut.

The floor is one read of w, g_f, g_r plus one write of the 1-bit mask at the copy bandwidth measured
in the same run. Each method runs in a fresh process so its peak memory is its own.

    python benchmarks/bench_mask.py --shapes llama2-50m            # CPU: torch vs reference
    python benchmarks/bench_mask.py --shapes llama2-7b             # GPU: triton vs torch (+ reference)
    python benchmarks/bench_mask.py --shapes llama2-7b --methods triton --sweep   # tune block/warps
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import resource
import sys
import threading
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

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_inputs(shapes, dtype, device, seed=0):
    """Random weights ~N(0, 0.02), forget grads ~N(0, 1e-3), retain grads ~N(0, 1e-9) (never zeros)."""
    g = torch.Generator(device=device).manual_seed(seed)
    params, gf, gr = {}, {}, {}
    for name, shape in shapes.items():
        params[name] = torch.randn(shape, generator=g, device=device, dtype=dtype).mul_(0.02)
        gf[name] = torch.randn(shape, generator=g, device=device, dtype=dtype).mul_(1e-3)
        gr[name] = torch.randn(shape, generator=g, device=device, dtype=dtype).mul_(1e-9)
    return params, gf, gr


def reference_procedure(params, gf, gr, ratio, gamma):
    """The reference implementation's mask procedure (re-implemented here for timing)."""
    scores = {n: ((params[n] - gr[n] / gamma) * gf[n]).abs() for n in params}
    flat = torch.cat([s.flatten().cpu() for s in scores.values()])
    del scores
    positions = torch.argsort(flat)
    ranks = torch.argsort(positions)
    del positions
    cut = int(flat.numel() * (1 - ratio))
    masks, start = {}, 0
    for name, w in params.items():
        masks[name] = (ranks[start : start + w.numel()] >= cut).view(w.shape)
        start += w.numel()
    return masks


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


class RssSampler:
    """Peak resident memory of this process while running, sampled every millisecond."""

    def __init__(self):
        self.peak = _current_rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _current_rss_bytes())
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _current_rss_bytes())


def instrument_phases(device) -> dict[str, float]:
    """Time the Triton selector's phases (synchronised): histogram passes, mask(+candidates), ties."""
    from wagle_kernels import select

    phases: dict[str, float] = {}

    def timed(label, fn):
        def wrapper(*a, **kw):
            synchronize(device)
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                synchronize(device)
                phases[label] = phases.get(label, 0.0) + time.perf_counter() - start

        return wrapper

    cls = select.TritonSelector
    cls.histogram = timed("histogram passes", cls.histogram)
    cls.select_compact = timed("two-pass select (its histogram pass included)", cls.select_compact)
    cls.write_masks = timed("tie + mask passes (fallback path)", cls.write_masks)
    return phases


SWEEP = [
    {"block": block, "num_warps": warps, "programs_per_sm": per_sm}
    for block in (2048, 4096, 8192)
    for warps in (4, 8)
    for per_sm in (2, 4, 8)
]


def configure_selector(config: dict | None, device) -> None:
    """Make every TritonSelector use ``config`` (block, num_warps, persistent programs per SM)."""
    from wagle_kernels import select

    cls = select.TritonSelector
    original = getattr(cls, "_bench_original_init", cls.__init__)
    cls._bench_original_init = original
    if config is None:
        cls.__init__ = original
        return
    per_sm = config["programs_per_sm"]
    programs = (
        per_sm * torch.cuda.get_device_properties(device).multi_processor_count
        if str(device).startswith("cuda")
        else per_sm
    )

    def init(self, *a, **kw):
        kw.update(block=config["block"], num_warps=config["num_warps"], max_programs=programs)
        original(self, *a, **kw)

    cls.__init__ = init


def _measure(method, args, params, gf, gr, ratio, phases):
    """Times (min and median), peak memory and pass counts of one method at one ratio (the first run
    warms up)."""
    from wagle.attribution import mask_from_gradients

    cuda = args.device == "cuda"
    base_rss = _current_rss_bytes()
    peak_rss, peak_alloc = base_rss, 0
    times, stats, selected = [], None, None
    for repeat in range(args.repeats + 1):  # the first run warms up (compiles kernels)
        phases.clear()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base_alloc = torch.cuda.memory_allocated()
        with RssSampler() as sampler:
            start = time.perf_counter()
            if method == "reference":
                result = reference_procedure(params, gf, gr, ratio, args.gamma)
            else:
                result, stats = mask_from_gradients(
                    params, gf, gr, ratio=ratio, gamma=args.gamma, backend=method, return_stats=True
                )
            synchronize(args.device)
            elapsed = time.perf_counter() - start
        peak_rss = max(peak_rss, sampler.peak)
        if cuda:
            peak_alloc = max(peak_alloc, torch.cuda.max_memory_allocated() - base_alloc)
        if repeat > 0 or args.repeats == 0:
            times.append(elapsed)
        selected = (
            result.num_selected if method != "reference" else int(sum(int(m.sum()) for m in result.values()))
        )
        del result
    timing = time_stats(times)
    return {
        "method": method,
        "ratio": ratio,
        "seconds": timing["min"],
        "median_seconds": timing["median"],
        "all_seconds": timing["all"],
        "selected": selected,
        "input_passes": None if stats is None else stats.input_passes,
        "histogram_passes": None if stats is None else stats.histogram_passes,
        "tie_passes": None if stats is None else stats.tie_passes,
        "phase_seconds_last_run": dict(phases),
        "peak_extra_bytes": int(peak_alloc if cuda else peak_rss - base_rss),
        "peak_kind": "cuda max_memory_allocated above inputs" if cuda else "host peak RSS above inputs",
    }


def _worker(method, args, queue):
    if method == "triton" and args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(args.threads or torch.get_num_threads())
    shapes = SHAPE_SETS[args.shapes]()
    params, gf, gr = make_inputs(shapes, DTYPES[args.dtype], args.device)
    phases = instrument_phases(args.device) if method == "triton" else {}
    synchronize(args.device)
    rows = []
    configs = SWEEP[: args.sweep_limit or None] if (args.sweep and method == "triton") else [None]
    for config in configs:
        if method == "triton":
            configure_selector(config, args.device)
        for ratio in args.ratios:
            row = _measure(method, args, params, gf, gr, ratio, phases)
            if config is not None:
                row["config"] = config
            rows.append(row)
    queue.put(rows)


def run_isolated(method, args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(method, args, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        return [{"method": method, "error": f"worker exited with code {proc.exitcode} (out of memory?)"}]
    return queue.get()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", choices=sorted(SHAPE_SETS), default="llama2-50m")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--ratios", default="0.5", help="comma list of ratios, e.g. 0.1,0.5,0.95")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help=f"triton only: time {len(SWEEP)} (block, num_warps, programs per SM) configurations",
    )
    parser.add_argument("--sweep-limit", type=int, default=0, help="only the first N sweep configurations")
    parser.add_argument("--gamma", type=float, default=1e-6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", default=None, help="comma list of triton,torch,reference")
    parser.add_argument("--interpreter", action="store_true", help="also run triton on CPU (interpreter)")
    parser.add_argument(
        "--reference-max-numel",
        type=float,
        default=1.5e9,
        help="skip the reference procedure above this many weights (host RAM)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=None, help="results JSON path (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    args.ratios = [float(r) for r in args.ratios.split(",")]
    for ratio in args.ratios:
        if not 0.0 <= ratio <= 1.0:
            parser.error(f"--ratios: {ratio} is not in [0, 1]")

    shapes = SHAPE_SETS[args.shapes]()
    numel = sum(math.prod(s) for s in shapes.values())
    elem = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    methods = args.methods.split(",") if args.methods else ["triton", "torch", "reference"]
    if args.device == "cpu" and not args.interpreter and "triton" in methods and not args.methods:
        methods.remove("triton")
    if numel > args.reference_max_numel and "reference" in methods and not args.methods:
        methods.remove("reference")

    info = environment()
    bandwidth = copy_bandwidth(args.device)
    input_bytes = 3 * numel * elem
    floor_bytes = input_bytes + math.ceil(numel / 8)
    floor_seconds = floor_bytes / bandwidth
    rows = []
    for method in methods:
        for row in run_isolated(method, args):
            if "seconds" in row:
                row["x_floor"] = row["seconds"] / floor_seconds
                row["effective_GBps"] = floor_bytes / row["seconds"] / 1e9
                if row.get("input_passes"):
                    moved = row["input_passes"] * input_bytes + math.ceil(numel / 8)
                    row["bytes_moved"] = moved
                    row["achieved_GBps"] = moved / row["seconds"] / 1e9
            rows.append(row)

    payload = {
        "benchmark": "mask generation (score + exact global top-k + bit-packed mask)",
        "environment": info,
        "config": {
            "shapes": args.shapes,
            "numel": numel,
            "dtype": args.dtype,
            "ratios": args.ratios,
            "gamma": args.gamma,
            "device": args.device,
        },
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "floor": {"bytes": floor_bytes, "seconds": floor_seconds},
        "results": rows,
    }
    path = args.out or results_path(f"mask-{args.shapes}", info)
    write_json(path, payload)

    print(f"{args.shapes}: {numel / 1e6:.1f}M weights, {args.dtype}, {info['device']}")
    print(
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; "
        f"floor {floor_bytes / 1e9:.2f} GB -> {floor_seconds * 1e3:.1f} ms"
    )
    print(
        f"{'method':<10} {'ratio':>5} {'config':<12} {'time':>10} {'x floor':>8} {'passes':>7} {'GB/s':>8} "
        f"{'peak extra':>12} selected"
    )
    for row in rows:
        if "error" in row:
            print(f"{row['method']:<10} {row['error']}")
            continue
        passes = row["input_passes"] if row["input_passes"] is not None else "-"
        gbps = row.get("achieved_GBps", row["effective_GBps"])
        config = "/".join(str(v) for v in row["config"].values()) if row.get("config") else "default"
        print(
            f"{row['method']:<10} {row['ratio']:>5} {config:<12} {row['seconds'] * 1e3:>8.1f}ms "
            f"{row['x_floor']:>8.2f} {passes!s:>7} {gbps:>8.1f} {row['peak_extra_bytes'] / 2**20:>10.0f}MB "
            f"{row['selected']}"
        )
    if args.sweep:
        timed = [r for r in rows if r.get("config") and "seconds" in r]
        if timed:
            best = min(timed, key=lambda r: r["seconds"])
            print(f"fastest configuration (block/num_warps/programs per SM): {best['config']}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
