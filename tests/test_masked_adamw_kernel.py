"""Fused masked AdamW / SGD Triton kernels (interpreter on CPU) against their torch reference paths."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HAS_CUDA

from wagle_kernels.bitpack import pack_bits
from wagle_kernels.mask_bits import STATE_BLOCK, block_prefix
from wagle_kernels.masked_adamw import AdamWScalars, masked_adamw_step_torch, masked_adamw_step_triton
from wagle_kernels.masked_sgd import SGDScalars, masked_sgd_step_torch, masked_sgd_step_triton
from wagle_kernels.multi_tensor import launch_chunks, launch_grid, padded_size

triton = pytest.importorskip("triton")

DEVICE = "cuda" if HAS_CUDA else "cpu"
# odd sizes around the block size, one element, empty
SIZES = (1, 7, 2047, 2048, 2049, 4099, 0)
BF16_ULP = 2.0**-7  # relative spacing of bf16 numbers in [1, 2)


def make_case(dtype, ratio, seed=0, sizes=SIZES, state_dtype=torch.float32, compact=False):
    g = torch.Generator().manual_seed(seed)
    case = []
    for n in sizes:
        if ratio in (0.0, 1.0):
            sel = torch.full((n,), bool(ratio))
        else:
            sel = torch.rand(n, generator=g) < ratio
        p = torch.randn(n, generator=g).to(dtype)
        bits = pack_bits(sel)
        state_n = int(sel.sum()) if compact else n
        case.append(
            {
                "p": p.to(DEVICE),
                "sel": sel.to(DEVICE),
                "bits": bits.to(DEVICE),
                "prefix": block_prefix(bits, n).to(DEVICE),
                "m": torch.zeros(state_n, dtype=state_dtype, device=DEVICE),
                "v": torch.zeros(state_n, dtype=state_dtype, device=DEVICE),
            }
        )
    return case


def clone_case(case):
    return [{k: v.clone() for k, v in entry.items()} for entry in case]


def grads_for(case, step, dtype):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(e["p"].numel(), generator=g).to(dtype).to(DEVICE) for e in case]


def run_adamw(
    case, steps, dtype, *, fused, compact, masked=True, decay_all=False, hyper=None, max_tensors=16
):
    hyper = hyper or {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}
    launches = []
    for step in range(1, steps + 1):
        grads = grads_for(case, step, dtype)
        scalars = [AdamWScalars.make(step=step, **hyper)] * len(case)
        if fused:
            launches.append(
                masked_adamw_step_triton(
                    [e["p"] for e in case],
                    grads,
                    [e["m"] for e in case],
                    [e["v"] for e in case],
                    [e["bits"] for e in case] if masked else None,
                    [e["prefix"] for e in case] if compact else None,
                    scalars,
                    decay_all=decay_all,
                    max_tensors=max_tensors,
                )
            )
        else:
            for e, grad, s in zip(case, grads, scalars, strict=True):
                masked_adamw_step_torch(
                    e["p"],
                    grad,
                    e["m"],
                    e["v"],
                    e["sel"] if masked else None,
                    s,
                    compact=compact,
                    decay_all=decay_all,
                )
    return launches


def assert_params_close(fused, ref, dtype):
    for a, b in zip(fused, ref, strict=True):
        if dtype == torch.float32:
            torch.testing.assert_close(a["p"], b["p"], rtol=2e-6, atol=1e-7)
        else:  # same fp32 math, one rounding to the storage dtype: at most one storage ulp apart
            ulp = BF16_ULP if dtype == torch.bfloat16 else 2.0**-10
            torch.testing.assert_close(a["p"].float(), b["p"].float(), rtol=ulp, atol=1e-6)
        for key in ("m", "v"):
            torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
def test_fused_adamw_equals_torch_path_and_keeps_unselected(dtype, compact, ratio):
    start = make_case(dtype, ratio, compact=compact)
    fused, ref = clone_case(start), clone_case(start)
    launches = run_adamw(fused, 3, dtype, fused=True, compact=compact)
    run_adamw(ref, 3, dtype, fused=False, compact=compact)
    assert launches == [1, 1, 1]  # six non-empty tensors, one launch
    assert_params_close(fused, ref, dtype)
    for a, s in zip(fused, start, strict=True):
        assert torch.equal(a["p"][~s["sel"]], s["p"][~s["sel"]])  # bit-identical
        if not compact:  # dense moments of unselected weights are never written
            assert not a["m"][~s["sel"]].any() and not a["v"][~s["sel"]].any()
        elif ratio == 1.0:
            assert a["m"].numel() == a["p"].numel()


def test_compact_state_holds_the_dense_state_of_the_selected_weights():
    start_dense = make_case(torch.float32, 0.4, seed=3)
    start_compact = make_case(torch.float32, 0.4, seed=3, compact=True)
    dense, compact = clone_case(start_dense), clone_case(start_compact)
    run_adamw(dense, 3, torch.float32, fused=True, compact=False)
    run_adamw(compact, 3, torch.float32, fused=True, compact=True)
    for d, c in zip(dense, compact, strict=True):
        assert torch.equal(d["p"], c["p"])
        assert torch.equal(d["m"][d["sel"]], c["m"]) and torch.equal(d["v"][d["sel"]], c["v"])
        assert c["m"].numel() == int(d["sel"].sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decay_all_is_the_reference_procedure(dtype):
    """grad * mask, then AdamW on every weight: the fused kernel and the torch path agree."""
    start = make_case(dtype, 0.4, seed=5)
    fused, ref = clone_case(start), clone_case(start)
    hyper = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1.0}  # visible in bf16
    run_adamw(fused, 3, dtype, fused=True, compact=False, decay_all=True, hyper=hyper)
    run_adamw(ref, 3, dtype, fused=False, compact=False, decay_all=True, hyper=hyper)
    assert_params_close(fused, ref, dtype)
    big = fused[3]
    assert not torch.equal(big["p"][~big["sel"]], start[3]["p"][~big["sel"]])  # decay moved them


def test_unmasked_tensors_and_large_lerp_weight():
    """No mask (every weight), and beta1 < 0.5 (torch's other lerp form)."""
    hyper = {"lr": 3e-2, "betas": (0.3, 0.9), "eps": 1e-6, "weight_decay": 0.0}
    start = make_case(torch.float32, 1.0, seed=7)
    fused, ref = clone_case(start), clone_case(start)
    run_adamw(fused, 3, torch.float32, fused=True, compact=False, masked=False, hyper=hyper)
    run_adamw(ref, 3, torch.float32, fused=False, compact=False, masked=False, hyper=hyper)
    assert_params_close(fused, ref, torch.float32)


def test_torch_path_is_torch_adamw_exactly():
    """On fp32 with every weight selected the reference path runs torch.optim.AdamW's own ops."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(300, generator=g)
    ours, theirs = p.clone(), p.clone().requires_grad_()
    m, v = torch.zeros(300), torch.zeros(300)
    opt = torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(1, 5):
        grad = torch.randn(300, generator=g)
        masked_adamw_step_torch(
            ours, grad, m, v, None, AdamWScalars.make(1e-2, (0.9, 0.999), 1e-8, 0.1, step)
        )
        theirs.grad = grad.clone()
        opt.step()
    assert torch.equal(ours, theirs.detach())


@pytest.mark.parametrize("max_tensors", [1, 2, 4])
def test_multi_tensor_launches_equal_per_tensor_launches(max_tensors):
    start = make_case(torch.bfloat16, 0.5, seed=11, compact=True)
    grouped, single = clone_case(start), clone_case(start)
    launches = run_adamw(grouped, 2, torch.bfloat16, fused=True, compact=True, max_tensors=max_tensors)
    run_adamw(single, 2, torch.bfloat16, fused=True, compact=True, max_tensors=1)
    assert launches == [math.ceil(6 / max_tensors)] * 2
    for a, b in zip(grouped, single, strict=True):
        assert torch.equal(a["p"], b["p"]) and torch.equal(a["m"], b["m"]) and torch.equal(a["v"], b["v"])


def test_per_tensor_step_counts_in_one_launch():
    """Tensors at different step counts share a launch; each gets its own bias corrections."""
    start = make_case(torch.float32, 0.5, seed=13, sizes=(5, 3000))
    fused, ref = clone_case(start), clone_case(start)
    grads = grads_for(start, 0, torch.float32)
    scalars = [AdamWScalars.make(1e-2, (0.9, 0.999), 1e-8, 0.1, t) for t in (1, 7)]
    masked_adamw_step_triton(
        [e["p"] for e in fused],
        grads,
        [e["m"] for e in fused],
        [e["v"] for e in fused],
        [e["bits"] for e in fused],
        None,
        scalars,
    )
    for e, grad, s in zip(ref, grads, scalars, strict=True):
        masked_adamw_step_torch(e["p"], grad, e["m"], e["v"], e["sel"], s)
    assert_params_close(fused, ref, torch.float32)


def test_bf16_state_dtype():
    start = make_case(torch.bfloat16, 0.5, seed=17, state_dtype=torch.bfloat16, compact=True)
    fused, ref = clone_case(start), clone_case(start)
    run_adamw(fused, 3, torch.bfloat16, fused=True, compact=True)
    run_adamw(ref, 3, torch.bfloat16, fused=False, compact=True)
    for a, b in zip(fused, ref, strict=True):
        assert a["m"].dtype == torch.bfloat16
        torch.testing.assert_close(a["p"].float(), b["p"].float(), rtol=BF16_ULP, atol=1e-6)
        torch.testing.assert_close(a["v"].float(), b["v"].float(), rtol=BF16_ULP, atol=1e-6)


def test_bf16_rounding_is_round_to_nearest_even():
    """The kernel's fp32 -> bf16 rounding (emulated in the interpreter) equals torch's, incl. ties,
    overflow to inf, subnormals, signed zeros and NaN."""
    specials = torch.tensor(
        [
            1.0 + 2.0**-8,  # tie -> even (down)
            1.0 + 3 * 2.0**-8,  # tie -> even (up)
            -(1.0 + 2.0**-8),
            3.3895313892515355e38,  # rounds up to inf
            1e-40,  # fp32 subnormal
            -0.0,
            float("inf"),
            float("-inf"),
        ]
    )
    values = torch.cat([specials, torch.randn(4000) * 10.0 ** torch.randint(-30, 30, (4000,)).float()])
    n = values.numel()
    p = torch.full((n,), -0.0, dtype=torch.bfloat16, device=DEVICE)  # -0 + x == x, also for x = -0
    # lr = 0, no decay: p_new = p*1 + 0 -> write the values through the grad-free path: use SGD with
    # lr = -1 on a zero param, d = g, so p = 0 + 1 * g = g (exact in fp32), then rounded to bf16
    g = values.to(DEVICE)
    masked_sgd_step_triton(
        [p],
        [g],
        None,
        [pack_bits(torch.ones(n, dtype=torch.bool)).to(DEVICE)],
        None,
        SGDScalars(-1.0, 0, 0, 0, False),
    )
    expected = values.to(torch.bfloat16).to(DEVICE)
    assert torch.equal(p.view(torch.int16), expected.view(torch.int16))
    nan = torch.full((3,), float("nan"), device=DEVICE)
    q = torch.zeros(3, dtype=torch.bfloat16, device=DEVICE)
    masked_sgd_step_triton(
        [q],
        [nan],
        None,
        [pack_bits(torch.ones(3, dtype=torch.bool)).to(DEVICE)],
        None,
        SGDScalars(-1.0, 0, 0, 0, False),
    )
    assert torch.isnan(q).all()


SGD_CONFIGS = [
    {"lr": 0.1, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False},
    {"lr": 0.1, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False},
    {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01, "nesterov": False},
    {"lr": 0.1, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.01, "nesterov": True},
]


@pytest.mark.parametrize("config", SGD_CONFIGS, ids=["plain", "momentum", "dampening+wd", "nesterov+wd"])
@pytest.mark.parametrize("compact", [False, True])
def test_fused_sgd_equals_torch_path(config, compact):
    s = SGDScalars(**config)
    start = make_case(torch.float32, 0.4, seed=19, compact=compact)
    fused, ref = clone_case(start), clone_case(start)
    for step in range(3):
        grads = grads_for(start, step, torch.float32)
        first = step == 0
        launches = masked_sgd_step_triton(
            [e["p"] for e in fused],
            grads,
            [e["m"] for e in fused] if s.momentum else None,
            [e["bits"] for e in fused],
            [e["prefix"] for e in fused] if compact else None,
            s,
            first=[first] * len(fused),
        )
        assert launches == 1
        for e, grad in zip(ref, grads, strict=True):
            masked_sgd_step_torch(
                e["p"], grad, e["m"] if s.momentum else None, e["sel"], s, first=first, compact=compact
            )
    for a, b, st in zip(fused, ref, start, strict=True):
        torch.testing.assert_close(a["p"], b["p"], rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(a["m"], b["m"], rtol=2e-6, atol=1e-7)
        assert torch.equal(a["p"][~st["sel"]], st["p"][~st["sel"]])


def test_launch_grouping_helpers():
    assert launch_chunks([5, 0, 9, 1, 0, 3], 2) == [[2, 0], [5, 3]]  # largest first
    assert launch_chunks([], 4) == []
    assert [padded_size(k) for k in (1, 2, 3, 5, 16)] == [1, 2, 4, 8, 16]
    assert launch_grid([1, STATE_BLOCK, STATE_BLOCK + 1]) == (2, 3)
    with pytest.raises(ValueError, match="power of two"):
        launch_chunks([1], 3)


def test_kernel_argument_errors():
    case = make_case(torch.float32, 0.5, sizes=(10, 20))
    ps, ms = [e["p"] for e in case], [e["m"] for e in case]
    s1 = AdamWScalars.make(1e-2, (0.9, 0.999), 1e-8, 0.1, 1)
    s2 = AdamWScalars.make(2e-2, (0.9, 0.999), 1e-8, 0.1, 1)
    with pytest.raises(ValueError, match="grads"):
        masked_adamw_step_triton(ps, ps[:1], ms, ms, None, None, [s1, s1])
    with pytest.raises(ValueError, match="share"):
        masked_adamw_step_triton(ps, ps, ms, ms, None, None, [s1, s2])
    with pytest.raises(ValueError, match="decay_all"):
        masked_adamw_step_triton(ps, ps, ms, ms, None, None, [s1, s1], decay_all=True)
    with pytest.raises(ValueError, match="step"):
        AdamWScalars.make(1e-2, (0.9, 0.999), 1e-8, 0.1, 0)
    with pytest.raises(ValueError, match="momentum"):
        masked_sgd_step_triton(ps, ps, None, None, None, SGDScalars(0.1, 0.9, 0, 0, False))


def test_scalars_follow_torch():
    s = AdamWScalars.make(1e-3, (0.9, 0.999), 1e-8, 0.1, 3)
    assert s.decay == 1 - 1e-3 * 0.1
    assert s.neg_step_size == -(1e-3 / (1 - 0.9**3))
    assert s.bc2_sqrt == (1 - 0.999**3) ** 0.5
    assert s.one_minus_beta1 == 1 - 0.9 and s.one_minus_beta2 == 1 - 0.999


@pytest.mark.gpu
def test_gpu_adamw_past_two_to_the_31():
    """One bf16 tensor of more than 2^31 weights, compact state: the selected weights on both sides
    of 2^31 (and the last one) follow AdamW; nothing else is written (needs ~15 GB)."""
    n = 2**31 + 3000
    gen = torch.Generator(device="cuda").manual_seed(5)
    p = torch.randn(n, generator=gen, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(n, generator=gen, device="cuda", dtype=torch.bfloat16)
    idx = (
        torch.cat(
            [
                torch.tensor([0, 5, 2047, 2**31 - 2, 2**31 - 1, 2**31, 2**31 + 1, n - 1]),
                torch.randint(2**31, n, (50,)),
                torch.randint(0, n, (50,)),
            ]
        )
        .unique()
        .cuda()
    )
    sel = torch.zeros(n, dtype=torch.bool, device="cuda")
    sel[idx] = True
    bits = pack_bits(sel)
    del sel
    k = idx.numel()
    m = torch.zeros(k, device="cuda")
    v = torch.zeros(k, device="cuda")
    before = p.clone()
    ref_p, ref_m, ref_v = p[idx].clone(), torch.zeros(k, device="cuda"), torch.zeros(k, device="cuda")
    scalars = AdamWScalars.make(1e-2, (0.9, 0.999), 1e-8, 0.1, 1)
    masked_adamw_step_triton([p], [grad], [m], [v], [bits], [block_prefix(bits, n)], [scalars])
    masked_adamw_step_torch(ref_p, grad[idx], ref_m, ref_v, None, scalars)
    torch.testing.assert_close(p[idx].float(), ref_p.float(), rtol=BF16_ULP, atol=1e-6)
    torch.testing.assert_close(m, ref_m, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=1e-7)
    p[idx] = before[idx]
    assert torch.equal(p, before)
