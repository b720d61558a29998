"""Kernel timing benchmarks (pytest-benchmark): each kernel against its torch path and the reference
procedure, parametrised by shape set and dtype, with the bytes model in ``extra_info`` so the saved
JSON carries GB/s and the ratio to the floor beside each time (computed from the minimum round, the
convention of every benchmark here; pytest-benchmark records min, median and the rest).

Shape sets: ``llama2-tiny`` on a CPU (the interpreter: a smoke run of the suite), a Llama-2-7B decoder
layer (``llama2-7b-layer``) on a GPU, or ``WAGLE_BENCH_SHAPES`` (a name from ``common.SHAPE_SETS``).
Densities: ``WAGLE_BENCH_RATIOS`` (comma-separated, default 0.5). ``benchmarks/gpu_session.sh`` runs
this suite for its kernel timings.
"""

from __future__ import annotations

import os

import pytest
import torch
from common import SHAPE_SETS, llama_shapes, synchronize

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPES = {
    **SHAPE_SETS,
    "llama2-7b-layer": lambda: {k: v for k, v in llama_shapes(layers=1).items() if ".layers." in k},
}
SHAPE_NAME = os.environ.get("WAGLE_BENCH_SHAPES") or ("llama2-7b-layer" if CUDA else "llama2-tiny")
ROUNDS = 5 if CUDA else 1
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
RATIOS = [float(r) for r in os.environ.get("WAGLE_BENCH_RATIOS", "0.5").split(",")]


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    params, gf, gr = {}, {}, {}
    for name, shape in SHAPES[SHAPE_NAME]().items():
        params[name] = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
        gf[name] = (torch.randn(shape, generator=g) * 1e-3).to(dtype).to(DEVICE)
        gr[name] = (torch.randn(shape, generator=g) * 1e-9).to(dtype).to(DEVICE)
    return params, gf, gr


def _run(benchmark, fn, bytes_moved: int, floor: int, numel: int):
    def timed():
        out = fn()
        synchronize(DEVICE)
        return out

    benchmark.extra_info.update(
        {"shapes": SHAPE_NAME, "numel": numel, "bytes_model": bytes_moved, "floor_bytes": floor}
    )
    result = benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.min
    benchmark.extra_info["GBps_min"] = bytes_moved / seconds / 1e9
    benchmark.extra_info["x_floor_bytes"] = bytes_moved / floor
    return result


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_mask(benchmark, backend, dtype, ratio):
    """Score + exact global top-k + packed mask at ``ratio``. Bytes model: two passes over (w, g_f,
    g_r) + the mask bits for the kernels; the torch path and the reference add their key/score and
    sort traffic, not modelled here (their figure is a lower bound)."""
    from bench_mask import reference_procedure

    from wagle.attribution import mask_from_gradients

    if backend == "triton" and not CUDA and dtype == "fp32" and SHAPE_NAME != "llama2-tiny":
        pytest.skip("interpreter: bf16 only beyond the tiny shapes")
    params, gf, gr = _inputs(DTYPES[dtype])
    numel = sum(w.numel() for w in params.values())
    element = params[next(iter(params))].element_size()
    floor = 3 * element * numel + numel // 8
    if backend == "reference":
        result = _run(
            benchmark, lambda: reference_procedure(params, gf, gr, ratio, 1e-6), floor, floor, numel
        )
        assert sum(int(m.sum()) for m in result.values()) >= int(ratio * numel)
        return
    result = _run(
        benchmark,
        lambda: mask_from_gradients(params, gf, gr, ratio=ratio, backend=backend, return_stats=True),
        2 * floor,
        floor,
        numel,
    )
    mask, stats = result
    benchmark.extra_info.update(
        {"ratio": ratio, "selected": mask.num_selected, "input_passes": stats.input_passes}
    )
    assert mask.num_selected == int(ratio * numel)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", ["dense", "compact", "auto"])
@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_masked_adamw_step(benchmark, backend, layout, dtype, ratio):
    """One masked AdamW step at density ``ratio`` (fp32 state). Bytes model: dense ``N (3e + 16)``,
    compact ``N 3e + 16 k`` (+ N/8 mask bits), auto: each parameter's resolved layout; the reference
    (``grad *= mask`` then ``torch.optim.AdamW``, foreach) ``N (2e + 1) + N (3e + 16)``."""
    from wagle.mask import WeightMask
    from wagle.optim import MaskedAdamW

    if backend == "reference" and layout != "dense":
        pytest.skip("the reference procedure keeps dense state")
    dtype_t = DTYPES[dtype]
    g = torch.Generator().manual_seed(1)
    params = {
        n: torch.nn.Parameter(torch.randn(s, generator=g).to(dtype_t).to(DEVICE))
        for n, s in SHAPES[SHAPE_NAME]().items()
    }
    selected = {n: (torch.rand(p.shape, generator=g) < ratio).to(DEVICE) for n, p in params.items()}
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=g).to(dtype_t).to(DEVICE)
    numel = sum(p.numel() for p in params.values())
    k = sum(int(m.sum()) for m in selected.values())
    e = params[next(iter(params))].element_size()
    dense = numel * (3 * e + 16) + numel // 8
    if backend == "reference":
        opt = torch.optim.AdamW(list(params.values()), lr=1e-3, weight_decay=0.1, foreach=True)
        grads = {n: p.grad.clone() for n, p in params.items()}

        def step():
            for n, p in params.items():
                p.grad = grads[n] * selected[n]
            opt.step()

        _run(benchmark, step, numel * (2 * e + 1) + dense, dense, numel)
        return
    mask = WeightMask.from_dict(selected)
    opt = MaskedAdamW(
        list(params.items()), mask, lr=1e-3, weight_decay=0.1, state_layout=layout, fused=backend == "triton"
    )
    layouts = opt.layouts()
    floor = sum(
        p.numel() * 3 * e + 16 * (mask.selected(n) if layouts[n] == "compact" else p.numel()) + p.numel() // 8
        for n, p in params.items()
    )
    _run(benchmark, opt.step, floor, floor, numel)
    benchmark.extra_info.update(
        {
            "ratio": ratio,
            "selected": k,
            "state_bytes": opt.state_nbytes(),
            "layouts": sorted(set(layouts.values())),
        }
    )
