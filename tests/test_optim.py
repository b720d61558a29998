"""Masked optimizers against torch.optim on mask-multiplied gradients; layouts, state_dict, in-backward."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from conftest import HAS_CUDA

from wagle import WeightMask
from wagle.mask import MaskMismatchError
from wagle.optim import MaskedAdamW, MaskedSGD, StepInBackward

DEVICE = "cuda" if HAS_CUDA else "cpu"
FUSED = [False, True]
# odd sizes, a one-element tensor, an empty one, one just past the kernel block (2048)
SHAPES = {"w": (33, 17), "b": (17,), "one": (1,), "big": (2051,), "empty": (0, 5)}
HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
BF16_ULP = 2.0**-7  # relative spacing of bf16 numbers in [1, 2)


def make_params(dtype=torch.float32, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).to(dtype).to(DEVICE).requires_grad_() for n, s in shapes.items()}


def clone_params(params, dtype=None):
    return {n: t.detach().clone().to(dtype or t.dtype).requires_grad_() for n, t in params.items()}


def make_mask(ratio, seed=1, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return WeightMask.from_dict({n: torch.rand(s, generator=g) < ratio for n, s in shapes.items()})


def grads(step, dtype=torch.float32, shapes=SHAPES):
    g = torch.Generator().manual_seed(100 + step)
    return {n: torch.randn(s, generator=g).to(dtype).to(DEVICE) for n, s in shapes.items()}


def run_masked(opt_cls, params, mask, steps, dtype=torch.float32, start=0, opt=None, **kw):
    opt = opt or opt_cls(list(params.items()), mask, **kw)
    for step in range(start, start + steps):
        for name, g in grads(step, dtype).items():
            params[name].grad = g.clone().to(params[name].dtype)
        opt.step()
    return opt


def run_reference(ref_cls, params, mask, steps, dtype=torch.float32, round_to=None, **kw):
    """The reference procedure: grad *= mask, then the plain torch optimizer (``round_to``: round the
    parameters to that dtype after every step, emulating low-precision storage with fp32 math)."""
    opt = ref_cls(list(params.values()), **kw)
    for step in range(steps):
        for name, g in grads(step, dtype).items():
            params[name].grad = (g.clone().to(params[name].dtype) * mask[name].to(DEVICE)).to(
                params[name].dtype
            )
        opt.step()
        if round_to is not None:
            with torch.no_grad():
                for p in params.values():
                    p.copy_(p.to(round_to).to(p.dtype))
    return opt


def moment_bytes(opt):
    return sum(
        s[k].numel() * s[k].element_size() for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")
    )


# ---- AdamW against torch.optim.AdamW -------------------------------------------------------------


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("layout", ["dense", "compact"])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
def test_adamw_selected_match_torch_unselected_bit_identical(fused, layout, ratio):
    mask = make_mask(ratio)
    start = make_params()
    ours, ref = clone_params(start), clone_params(start)
    opt = run_masked(MaskedAdamW, ours, mask, 4, state_layout=layout, fused=fused, **HYPER)
    run_reference(torch.optim.AdamW, ref, mask, 4, foreach=False, **HYPER)
    for name in SHAPES:
        sel = mask[name].to(DEVICE)
        # fp32: within fp32 rounding of torch (the torch path runs torch's own operations)
        torch.testing.assert_close(ours[name][sel], ref[name][sel], rtol=2e-6, atol=1e-7)
        assert torch.equal(ours[name][~sel], start[name][~sel]), f"{name}: unselected weights changed"
    if ratio == 0.0:  # empty mask: no state at all
        assert len(opt.state) == 0 and opt.state_nbytes() == 0
    else:  # params without selected weights (the empty tensor) own no state
        assert all(mask.selected(opt.plan(p).name) > 0 for p in opt.state)
        assert all(s["step"].item() == 4.0 and s["step"].dtype == torch.float32 for s in opt.state.values())


def test_adamw_full_mask_torch_path_is_torch_adamw_bitwise():
    mask = make_mask(1.0)
    start = make_params()
    ours, ref = clone_params(start), clone_params(start)
    run_masked(MaskedAdamW, ours, mask, 3, fused=False, **HYPER)
    run_reference(torch.optim.AdamW, ref, mask, 3, foreach=False, **HYPER)
    for name in SHAPES:
        assert torch.equal(ours[name], ref[name]), name


@pytest.mark.parametrize("fused", FUSED)
def test_adamw_decay_unselected_reproduces_reference_procedure(fused):
    mask = make_mask(0.4)
    start = make_params()
    ours, ref = clone_params(start), clone_params(start)
    run_masked(MaskedAdamW, ours, mask, 3, decay_unselected=True, fused=fused, **HYPER)
    run_reference(torch.optim.AdamW, ref, mask, 3, foreach=False, **HYPER)
    for name in SHAPES:
        if fused:
            torch.testing.assert_close(ours[name], ref[name], rtol=2e-6, atol=1e-7)
        else:  # the same torch operations on the same tensors
            assert torch.equal(ours[name], ref[name]), name
    sel = mask["w"].to(DEVICE)
    assert not torch.equal(ours["w"][~sel], start["w"][~sel])  # decay moved the frozen weights


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_adamw_bf16_params(fused, layout):
    """bf16 params, fp32 moments, fp32 math, one rounding per step. Stated tolerances: within 1 bf16 ulp
    (relative 2^-7) of torch's fp32 AdamW whose parameters are rounded to bf16 after every step, and
    within 0.05 (a few bf16 ulps at |p| ~ 1-4) of torch.optim.AdamW run in bf16 (which also keeps
    bf16 moments and rounds after every operation)."""
    mask = make_mask(0.5)
    start = make_params(torch.bfloat16)
    ours = clone_params(start)
    emulated = clone_params(start, torch.float32)
    plain = clone_params(start)
    run_masked(MaskedAdamW, ours, mask, 3, dtype=torch.bfloat16, state_layout=layout, fused=fused, **HYPER)
    run_reference(
        torch.optim.AdamW,
        emulated,
        mask,
        3,
        dtype=torch.bfloat16,
        round_to=torch.bfloat16,
        foreach=False,
        **HYPER,
    )
    run_reference(torch.optim.AdamW, plain, mask, 3, dtype=torch.bfloat16, foreach=False, **HYPER)
    for name in SHAPES:
        sel = mask[name].to(DEVICE)
        assert ours[name].dtype == torch.bfloat16
        torch.testing.assert_close(ours[name][sel].float(), emulated[name][sel], rtol=BF16_ULP, atol=1e-6)
        torch.testing.assert_close(ours[name][sel].float(), plain[name][sel].float(), rtol=0, atol=0.05)
        assert torch.equal(ours[name][~sel], start[name][~sel])


@pytest.mark.parametrize("fused", FUSED)
def test_adamw_bf16_state_dtype(fused):
    mask = make_mask(0.5)
    start = make_params()
    ours, ref = clone_params(start), clone_params(start)
    opt = run_masked(
        MaskedAdamW, ours, mask, 3, state_dtype=torch.bfloat16, state_layout="compact", fused=fused, **HYPER
    )
    run_masked(MaskedAdamW, ref, mask, 3, state_layout="compact", fused=fused, **HYPER)
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in opt.state.values())
    for name in SHAPES:
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=2e-3)


@pytest.mark.parametrize("fused", FUSED)
def test_unmasked_dense_parameters_match_torch(fused):
    partial = WeightMask.from_dict({"w": make_mask(0.5)["w"]})
    start = make_params()
    ours, ref = clone_params(start), clone_params(start)
    run_masked(MaskedAdamW, ours, partial, 3, unmasked="dense", fused=fused, **HYPER)
    opt = torch.optim.AdamW([ref[n] for n in SHAPES if n != "w"], foreach=False, **HYPER)
    for step in range(3):
        for n, g in grads(step).items():
            ref[n].grad = g.clone()
        opt.step()
    for name in SHAPES:
        if name != "w":
            torch.testing.assert_close(ours[name], ref[name], rtol=2e-6, atol=1e-7)


# ---- layouts and memory --------------------------------------------------------------------------


@pytest.mark.parametrize("fused", FUSED)
def test_compact_equals_dense_bitwise(fused):
    mask = make_mask(0.3)
    start = make_params()
    dense, compact = clone_params(start), clone_params(start)
    opt_dense = run_masked(MaskedAdamW, dense, mask, 3, fused=fused, state_layout="dense", **HYPER)
    opt_compact = run_masked(MaskedAdamW, compact, mask, 3, fused=fused, state_layout="compact", **HYPER)
    for name in SHAPES:
        assert torch.equal(dense[name], compact[name]), name
    for p_dense, p_compact in zip(dense.values(), compact.values(), strict=True):
        if p_dense in opt_dense.state:
            sel = mask[opt_dense.plan(p_dense).name].reshape(-1).to(DEVICE)
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(
                    opt_dense.state[p_dense][key].reshape(-1)[sel], opt_compact.state[p_compact][key]
                )


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.95])
def test_compact_state_memory_is_ratio_times_dense(ratio):
    shapes = {"a": (64, 48), "b": (3000,), "c": (48,)}
    mask = make_mask(ratio, shapes=shapes)
    params = make_params(shapes=shapes)
    opts = {}
    for layout in ("dense", "compact"):
        p = clone_params(params)
        opts[layout] = opt = MaskedAdamW(list(p.items()), mask, state_layout=layout)
        g = grads(0, shapes=shapes)
        for n in shapes:
            p[n].grad = g[n]
        opt.step()
    numel = sum(math.prod(s) for s in shapes.values())
    assert moment_bytes(opts["compact"]) == 2 * 4 * mask.num_selected
    assert moment_bytes(opts["dense"]) == 2 * 4 * numel
    measured = opts["compact"].state_nbytes() / opts["dense"].state_nbytes()
    assert measured == pytest.approx(mask.num_selected / numel, abs=0.01)
    assert abs(measured - ratio) < 0.05


def test_fused_compact_index_metadata_is_small():
    mask = make_mask(0.5)
    params = make_params()
    opt = run_masked(MaskedAdamW, params, mask, 1, state_layout="compact", fused=True)
    numel = sum(math.prod(s) for s in SHAPES.values())
    # int64 prefix per 2048-weight block: a few bytes per tensor, ~0.004 B/weight
    assert 0 < opt.metadata_nbytes() <= 8 * (numel // 2048 + len(SHAPES))


# ---- state_dict ---------------------------------------------------------------------------------


def _trajectory_with_restart(opt_cls, layout, fused, restart_at, steps=5, **kw):
    mask = make_mask(0.5)
    start = make_params()
    a = clone_params(start)
    opt_a = opt_cls(list(a.items()), mask, state_layout=layout, fused=fused, **kw)
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, step_size=2, gamma=0.5)
    saved = None
    for step in range(steps):
        for n, g in grads(step).items():
            a[n].grad = g.clone()
        opt_a.step()
        sched_a.step()
        if step == restart_at:
            buffer = io.BytesIO()
            torch.save({"opt": opt_a.state_dict(), "sched": sched_a.state_dict()}, buffer)
            b = clone_params(a)
            saved = buffer.getvalue()
    loaded = torch.load(io.BytesIO(saved), weights_only=False)
    opt_b = opt_cls(list(b.items()), mask, state_layout=layout, fused=fused, **kw)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, step_size=2, gamma=0.5)
    opt_b.load_state_dict(loaded["opt"])
    sched_b.load_state_dict(loaded["sched"])
    for step in range(restart_at + 1, steps):
        for n, g in grads(step).items():
            b[n].grad = g.clone()
        opt_b.step()
        sched_b.step()
    return a, b, opt_a, opt_b


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_state_dict_round_trip_mid_training(fused, layout):
    a, b, opt_a, opt_b = _trajectory_with_restart(MaskedAdamW, layout, fused, restart_at=1, lr=1e-2)
    for n in SHAPES:
        assert torch.equal(a[n], b[n]), n
    assert opt_b.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"]
    for p, q in zip(a.values(), b.values(), strict=True):
        assert (p in opt_a.state) == (q in opt_b.state)
        if p in opt_a.state:
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(opt_a.state[p][key], opt_b.state[q][key])


def test_sgd_state_dict_round_trip_mid_training():
    a, b, _, _ = _trajectory_with_restart(MaskedSGD, "compact", False, restart_at=2, lr=0.1, momentum=0.9)
    for n in SHAPES:
        assert torch.equal(a[n], b[n]), n


def test_state_dict_for_another_mask_layout_or_optimizer_is_rejected():
    params = make_params()
    opt = run_masked(MaskedAdamW, params, make_mask(0.5), 1, state_layout="dense")
    state = opt.state_dict()
    assert state["wagle"]["state_layout"] == "dense" and state["wagle"]["mask_fingerprint"]
    other = MaskedAdamW(list(make_params().items()), make_mask(0.5, seed=7))
    with pytest.raises(MaskMismatchError, match="another mask"):
        other.load_state_dict(state)
    shapes = {"x": (3, 3)}
    other_model = MaskedAdamW(list(make_params(shapes=shapes).items()), make_mask(0.5, shapes=shapes))
    with pytest.raises(MaskMismatchError, match="another mask"):
        other_model.load_state_dict(state)
    compact = MaskedAdamW(list(make_params().items()), make_mask(0.5), state_layout="compact")
    with pytest.raises(ValueError, match="state_layout"):
        compact.load_state_dict(state)
    with pytest.raises(ValueError, match="wagle"):
        compact.load_state_dict(torch.optim.AdamW(list(make_params().values())).state_dict())
    sgd = MaskedSGD(list(make_params().items()), make_mask(0.5), state_layout="dense")
    with pytest.raises(ValueError, match="MaskedAdamW"):
        sgd.load_state_dict(state)
    corrupt = copy.deepcopy(state)
    first = next(iter(corrupt["state"]))
    corrupt["state"][first]["exp_avg"] = corrupt["state"][first]["exp_avg"].reshape(-1)[:-1]
    with pytest.raises(ValueError, match="exp_avg"):
        MaskedAdamW(list(make_params().items()), make_mask(0.5), state_layout="dense").load_state_dict(
            corrupt
        )


def test_auto_layout_rule():
    """compact iff the state bytes it saves cover its index metadata (per path)."""
    from wagle.optim import auto_layout

    n = 2048 * 10
    # fused: 8 bytes per 2048 weights; AdamW fp32 moments save 8 bytes per unselected weight
    assert auto_layout(n, n - 10, 2, 4, "fused") == "compact"
    assert auto_layout(n, n - 9, 2, 4, "fused") == "dense"
    assert auto_layout(n, n - 20, 2, 2, "fused") == "compact"  # bf16 moments: 4 bytes per weight
    assert auto_layout(n, n - 19, 2, 2, "fused") == "dense"
    assert auto_layout(n + 1, n - 20, 2, 2, "fused") == "dense"  # a partial block costs a whole one
    assert auto_layout(n, n, 2, 4, "torch") == "compact"  # no extra metadata: never more bytes
    assert auto_layout(n, 0, 0, 4, "fused") == "dense"  # no state to save


def _mask_big_all_selected():
    """``big`` fully selected (dense on the fused path, compact on the torch path), the rest at 0.5."""
    g = torch.Generator().manual_seed(1)
    return WeightMask.from_dict(
        {n: torch.rand(s, generator=g) < (2.0 if n == "big" else 0.5) for n, s in SHAPES.items()}
    )


@pytest.mark.parametrize("fused", FUSED)
def test_auto_layout_resolves_per_parameter_and_resumes_exactly(fused):
    """The default layout is "auto": resolved per parameter, recorded in the state_dict, and a restart
    from it continues bit-identically (and like the explicitly chosen layouts)."""
    from wagle.optim import auto_layout

    opt = MaskedAdamW(list(make_params().items()), make_mask(0.5), fused=fused)
    assert opt.state_layout == "auto"
    path = "fused" if fused else "torch"
    for _, plan in opt.named_plans():
        assert plan.layout == auto_layout(plan.numel, plan.selected, 2, 4, path), plan
    assert set(opt.layouts()) == {"w", "b", "one", "big", "empty"} and opt.layouts()["big"] == "compact"
    full = MaskedAdamW(list(make_params().items()), _mask_big_all_selected(), fused=fused)
    assert full.layouts()["big"] == ("dense" if fused else "compact")
    assert full.layouts()["w"] == "compact"
    assert (
        MaskedAdamW(list(make_params().items()), make_mask(0.5), decay_unselected=True).layouts()["big"]
        == "dense"
    )
    a, b, opt_a, opt_b = _trajectory_with_restart(MaskedAdamW, "auto", fused, restart_at=2)
    state = opt_a.state_dict()["wagle"]
    assert state["state_layout"] == "auto" and state["layouts"] == opt_a.layouts()
    assert opt_b.layouts() == opt_a.layouts()
    c, _, _, _ = _trajectory_with_restart(MaskedAdamW, "compact", fused, restart_at=2)
    for n in SHAPES:
        assert torch.equal(a[n], b[n]) and torch.equal(a[n], c[n]), n


def test_auto_state_loads_where_the_rule_resolves_otherwise():
    """An "auto" optimizer adopts the saved per-parameter layouts (a state resolved on the torch path
    loads on the fused path, which would resolve ``big`` dense) and continues identically; an explicit
    layout must match them; a state saved before layouts were recorded loads as its one layout."""
    mask = _mask_big_all_selected()
    params = make_params()
    torch_path = run_masked(MaskedAdamW, clone_params(params), mask, 2, fused=False)
    assert set(torch_path.layouts().values()) == {"compact"}
    state = torch_path.state_dict()
    fresh = MaskedAdamW(list(clone_params(params).items()), mask, fused=True)
    assert fresh.layouts()["big"] == "dense" and fresh.layouts()["w"] == "compact"
    resumed_params_start = clone_params(params)
    resumed = MaskedAdamW(list(resumed_params_start.items()), mask, fused=True)
    resumed.load_state_dict(state)
    assert resumed.layouts() == torch_path.layouts()
    big = next(p for p, plan in resumed.named_plans() if plan.name == "big")
    assert resumed.state[big]["exp_avg"].shape == (mask.selected("big"),)
    ref_params = clone_params(params)
    ref = run_masked(MaskedAdamW, ref_params, mask, 2, fused=False)
    with torch.no_grad():
        for n in SHAPES:
            resumed_params_start[n].copy_(ref_params[n])
    run_masked(MaskedAdamW, resumed_params_start, mask, 2, start=2, opt=resumed)
    run_masked(MaskedAdamW, ref_params, mask, 2, start=2, opt=ref)
    for n in SHAPES:  # fused and torch AdamW agree to rounding only
        torch.testing.assert_close(resumed_params_start[n], ref_params[n], rtol=1e-6, atol=1e-6)
    for explicit in ("dense", "compact"):
        if explicit == "compact":
            MaskedAdamW(list(clone_params(params).items()), mask, state_layout=explicit).load_state_dict(
                state
            )
            continue
        with pytest.raises(ValueError, match="state_layout"):
            MaskedAdamW(list(clone_params(params).items()), mask, state_layout=explicit).load_state_dict(
                state
            )
    old = copy.deepcopy(state)
    old["wagle"]["state_layout"] = "compact"
    del old["wagle"]["layouts"]
    restored = MaskedAdamW(list(clone_params(params).items()), mask, fused=True)
    restored.load_state_dict(old)
    assert set(restored.layouts().values()) == {"compact"}
    with pytest.raises(ValueError, match="compact state"):
        MaskedAdamW(list(clone_params(params).items()), mask, decay_unselected=True).load_state_dict(state)


def test_state_dict_converts_state_dtype():
    params = make_params()
    opt = run_masked(
        MaskedAdamW, params, make_mask(0.5), 2, state_layout="compact", state_dtype=torch.bfloat16
    )
    fp32 = MaskedAdamW(list(clone_params(params).items()), make_mask(0.5), state_layout="compact")
    fp32.load_state_dict(opt.state_dict())
    assert all(s["exp_avg"].dtype == torch.float32 for s in fp32.state.values())
    assert len(fp32.state) == len(opt.state)


# ---- step in backward ---------------------------------------------------------------------------


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Embedding(11, 6), torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).to(DEVICE)


def tiny_loss(model, step):
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, 11, (4,), generator=g).to(DEVICE)
    return model(tokens).pow(2).mean()


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("accumulation", [1, 3])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_step_in_backward_equals_normal_step(fused, accumulation, optimizer):
    model = tiny_model()
    twin = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    gen = torch.Generator().manual_seed(3)
    bools = {n: torch.rand(p.shape, generator=gen) < 0.6 for n, p in model.named_parameters()}
    bools[names[-1]] = torch.zeros_like(bools[names[-1]])  # a parameter with no selected weight
    mask = WeightMask.from_dict(bools)

    def build(m):
        if optimizer == "adamw":
            return MaskedAdamW(m.named_parameters(), mask, lr=1e-2, fused=fused, state_layout="compact")
        return MaskedSGD(m.named_parameters(), mask, lr=0.1, momentum=0.9, nesterov=True, fused=fused)

    opt_a, opt_b = build(model), build(twin)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda s: 0.5**s)
    sched_a = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda s: 0.5**s)
    hooks = StepInBackward(opt_b, accumulation_steps=accumulation)
    selected = sum(mask.selected(n) for n in names)
    for step in range(2 * accumulation):
        (tiny_loss(model, step) / accumulation).backward()
        (tiny_loss(twin, step) / accumulation).backward()
        assert all(p.grad is None for p in twin.parameters())  # no gradient is ever held
        if (step + 1) % accumulation == 0:
            assert hooks.partial_nbytes() == 0
            opt_a.step()
            opt_a.zero_grad()
            sched_a.step()
            sched.step()
        else:  # between steps: selected entries only
            assert hooks.partial_nbytes() == 4 * selected
    hooks.remove()
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("fused", FUSED)
def test_step_in_backward_per_parameter_clipping(fused):
    """clip_norm_per_param == clipping each parameter's masked gradient on its own, then stepping."""
    model = tiny_model()
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(4)
    mask = WeightMask.from_dict(
        {n: torch.rand(p.shape, generator=gen) < 0.5 for n, p in model.named_parameters()}
    )
    opt_a = MaskedAdamW(model.named_parameters(), mask, lr=1e-2, fused=fused)
    opt_b = MaskedAdamW(twin.named_parameters(), mask, lr=1e-2, fused=fused)
    max_norm = 0.05
    hooks = StepInBackward(opt_b, clip_norm_per_param=max_norm)
    for step in range(2):
        (tiny_loss(model, step) * 10).backward()
        (tiny_loss(twin, step) * 10).backward()
        with torch.no_grad():
            for name, p in model.named_parameters():
                sel = mask[name].to(DEVICE)
                norm = torch.linalg.vector_norm(p.grad[sel], 2.0)
                p.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        opt_a.step()
        opt_a.zero_grad()
    assert hooks.global_norm() > 0 and set(hooks.last_norms) == {n for n, _ in model.named_parameters()}
    hooks.remove()
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)


def test_step_in_backward_frees_frozen_gradients_and_validates():
    model = tiny_model()
    names = [n for n, _ in model.named_parameters()]
    mask = WeightMask.from_dict({names[1]: torch.ones(model[1].weight.shape, dtype=torch.bool)})
    opt = MaskedAdamW(model.named_parameters(), mask, unmasked="freeze")
    with StepInBackward(opt) as hooks:
        tiny_loss(model, 0).backward()
        assert all(p.grad is None for p in model.parameters())
        assert len(opt.state) == 1
    assert not hooks._handles
    with pytest.raises(ValueError, match="accumulation_steps"):
        StepInBackward(opt, accumulation_steps=0)
    with pytest.raises(ValueError, match="clip_norm_per_param"):
        StepInBackward(opt, clip_norm_per_param=-1.0)
    with pytest.raises(TypeError, match="MaskedAdamW"):
        StepInBackward(torch.optim.SGD(model.parameters(), lr=0.1))


# ---- SGD against torch.optim.SGD --------------------------------------------------------------------


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("layout", ["dense", "compact"])
@pytest.mark.parametrize(
    "kw",
    [
        {"lr": 0.1},
        {"lr": 0.1, "momentum": 0.9},
        {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
        {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    ],
    ids=["plain", "momentum", "dampening+wd", "nesterov+wd"],
)
def test_sgd_matches_torch(fused, layout, kw):
    mask = make_mask(0.4)
    start = make_params()
    ours, ref = clone_params(start), clone_params(start)
    opt = run_masked(MaskedSGD, ours, mask, 3, fused=fused, state_layout=layout, **kw)
    run_reference(torch.optim.SGD, ref, mask, 3, foreach=False, **kw)
    for name in SHAPES:
        sel = mask[name].to(DEVICE)
        if fused:
            torch.testing.assert_close(ours[name][sel], ref[name][sel], rtol=2e-6, atol=1e-7)
        else:
            assert torch.equal(ours[name][sel], ref[name][sel]), name
        assert torch.equal(ours[name][~sel], start[name][~sel])
    buffers = [s["momentum_buffer"] for s in opt.state.values() if "momentum_buffer" in s]
    if kw.get("momentum"):
        expected = (
            mask.num_selected
            if layout == "compact"
            else sum(math.prod(s) for n, s in SHAPES.items() if mask.selected(n))
        )
        assert sum(b.numel() for b in buffers) == expected
    else:
        assert not buffers


# ---- API, groups, schedulers, launches, errors ----------------------------------------------------


def test_param_groups_lr_scheduler_and_add_param_group():
    params = make_params()
    mask = make_mask(0.5)
    names = list(params)
    opt = MaskedAdamW(
        [
            {"params": [(n, params[n]) for n in names[:2]], "lr": 0.1},
            {"params": [(n, params[n]) for n in names[2:4]], "weight_decay": 0.0},
        ],
        mask,
        lr=0.01,
    )
    assert opt.param_groups[0]["param_names"] == names[:2]
    opt.add_param_group({"params": [(names[4], params[names[4]])], "lr": 0.5})
    assert opt.plan(params[names[4]]).name == names[4]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    for n, g in grads(0).items():
        params[n].grad = g
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.005, 0.25])
    opt.zero_grad()
    assert all(p.grad is None for p in params.values())
    with pytest.raises(ValueError, match="appears twice"):
        opt.add_param_group({"params": [(names[0], torch.zeros(1, requires_grad=True))]})


def test_fused_step_launches_one_kernel_per_16_tensors_per_bucket():
    shapes = {f"t{i}": (7 + i,) for i in range(20)}
    mask = make_mask(0.5, shapes=shapes)
    params = make_params(shapes=shapes)
    params["t3"] = params["t3"].detach().to(torch.bfloat16).requires_grad_()  # its own dtype bucket
    reference = clone_params(params)
    opt = MaskedAdamW(list(params.items()), mask, state_layout="compact", fused=True)
    ref = MaskedAdamW(list(reference.items()), mask, state_layout="compact", fused=False)
    for step in range(2):
        g = grads(step, shapes=shapes)
        for n in shapes:
            params[n].grad = g[n].to(params[n].dtype)
            reference[n].grad = g[n].to(params[n].dtype)
        opt.step()
        ref.step()
        fp32 = sum(1 for n in shapes if n != "t3" and mask.selected(n) > 0)
        assert opt.launches == math.ceil(fp32 / 16) + 1
    for n in shapes:
        tol = {"rtol": BF16_ULP, "atol": 1e-6} if n == "t3" else {"rtol": 2e-6, "atol": 1e-7}
        torch.testing.assert_close(params[n].float(), reference[n].float(), **tol)


def test_unmasked_policies():
    params = make_params()
    partial = WeightMask.from_dict({"w": torch.rand(SHAPES["w"]) < 0.5})
    with pytest.raises(MaskMismatchError, match=r"'b'.*unmasked='dense'"):
        MaskedAdamW(list(params.items()), partial)
    opt = MaskedAdamW(list(params.items()), partial, unmasked="freeze", lr=0.1)
    before = {n: t.detach().clone() for n, t in params.items()}
    for n, g in grads(0).items():
        params[n].grad = g
    opt.step()
    assert torch.equal(params["b"], before["b"]) and len(opt.state) == 1
    dense = MaskedAdamW(list(params.items()), partial, unmasked="dense", lr=0.1)
    dense.step()
    assert not torch.equal(params["b"], before["b"])


def test_bad_input_errors_name_the_parameter():
    params = make_params()
    mask = make_mask(0.5)
    with pytest.raises(TypeError, match="pairs"):
        MaskedAdamW(list(params.values()), mask)
    with pytest.raises(TypeError, match="WeightMask"):
        MaskedAdamW(list(params.items()), {"w": torch.ones(3)})
    with pytest.raises(MaskMismatchError, match="'w'.*shape"):
        MaskedAdamW([("w", torch.zeros(3, 3, requires_grad=True))], mask)
    with pytest.raises(ValueError, match="state_layout"):
        MaskedAdamW(list(params.items()), mask, state_layout="sparse")
    with pytest.raises(ValueError, match="state_dtype"):
        MaskedAdamW(list(params.items()), mask, state_dtype=torch.float16)
    with pytest.raises(ValueError, match="decay_unselected"):
        MaskedAdamW(list(params.items()), mask, state_layout="compact", decay_unselected=True)
    with pytest.raises(ValueError, match="lr"):
        MaskedAdamW(list(params.items()), mask, lr=-1)
    with pytest.raises(ValueError, match="betas"):
        MaskedAdamW(list(params.items()), mask, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="nesterov"):
        MaskedSGD(list(params.items()), mask, nesterov=True)
    with pytest.raises(ValueError, match="appears twice"):
        MaskedAdamW([("w", params["w"]), ("w", params["b"])], mask)
    complex_param = torch.zeros(SHAPES["w"], dtype=torch.complex64, requires_grad=True)
    with pytest.raises(TypeError, match="'w'.*floating-point"):
        MaskedAdamW([("w", complex_param)], mask)
    strided = torch.randn(17, 33).t().requires_grad_()
    with pytest.raises(ValueError, match="'w'.*contiguous"):
        MaskedAdamW([("w", strided)], mask)
    meta = torch.zeros(17, device="meta", requires_grad=True)
    with pytest.raises(ValueError, match="fused group must be on one device"):
        MaskedAdamW([("w", params["w"]), ("b", meta)], mask, fused=True)
    opt = MaskedAdamW([("w", params["w"])], mask)
    params["w"].grad = torch.randn(SHAPES["w"]).to(DEVICE).to_sparse()
    with pytest.raises(TypeError, match="'w'.*sparse"):
        opt.step()


@pytest.mark.skipif(HAS_CUDA, reason="CPU tensors without the interpreter")
def test_fused_true_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        MaskedAdamW(list(make_params().items()), make_mask(0.5), fused=True)


def test_deepcopy_and_pickle_keep_the_mask_pairing():
    import pickle

    mask = make_mask(0.5)
    params = make_params()
    opt = run_masked(MaskedAdamW, params, mask, 2, state_layout="compact", **HYPER)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        new_params = [p for g in clone.param_groups for p in g["params"]]
        assert [clone.plan(p).name for p in new_params] == list(SHAPES)
        for name, g in grads(5).items():
            new_params[list(SHAPES).index(name)].grad = g
        clone.step()
    run_masked(MaskedAdamW, params, mask, 1, start=5, opt=opt)
    for name, p in zip(SHAPES, new_params, strict=True):
        assert torch.equal(p, params[name]), name


def test_fp64_parameters_use_fp64_math_on_the_torch_path():
    mask = make_mask(1.0)
    start = make_params(torch.float64)
    ours, ref = clone_params(start), clone_params(start)
    opt = run_masked(MaskedAdamW, ours, mask, 3, **HYPER)
    assert not opt.use_fused(ours["w"]) or HAS_CUDA is False
    run_reference(torch.optim.AdamW, ref, mask, 3, dtype=torch.float64, foreach=False, **HYPER)
    for name in SHAPES:
        assert ours[name].dtype == torch.float64  # fp64 math, fp32 moments (state_dtype)
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-6, atol=1e-9)
    with pytest.raises(TypeError, match="fp32/bf16/fp16"):
        MaskedAdamW(list(make_params(torch.float64).items()), mask, fused=True)


def test_state_dict_hooks_fire_around_the_mask_checks():
    """User hooks on state_dict/load_state_dict fire as on any torch optimizer: load pre-hooks see the
    saved dict before the mask checks, post-hooks see the restored state (moments kept in fp32 for
    bf16 parameters, not cast to the parameter's dtype)."""
    mask = make_mask(0.5)
    params = make_params(torch.bfloat16)
    opt = run_masked(MaskedAdamW, params, mask, 2, state_layout="compact", **HYPER)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("save-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append(("save-post", "wagle" in sd)))
    state = opt.state_dict()
    assert calls == ["save-pre", ("save-post", True)]

    twin = MaskedAdamW(list(clone_params(params).items()), mask, state_layout="compact", **HYPER)
    seen = []

    def pre(o, sd):
        seen.append(("pre", sorted(sd)))
        return {**sd, "param_groups": [{**g, "lr": 0.5} for g in sd["param_groups"]]}

    def post(o):
        seen.append(("post", {s["exp_avg"].dtype for s in o.state.values()}))

    twin.register_load_state_dict_pre_hook(pre)
    twin.register_load_state_dict_post_hook(post)
    twin.load_state_dict(state)
    assert seen == [("pre", ["param_groups", "state", "wagle"]), ("post", {torch.float32})]
    assert all(g["lr"] == 0.5 for g in twin.param_groups)  # the pre-hook's change was loaded
    for p_a, p_b in zip(opt.state, twin.state, strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p_a][key], twin.state[p_b][key])
    other = MaskedAdamW(list(clone_params(params).items()), make_mask(0.2), state_layout="compact")
    with pytest.raises(MaskMismatchError):
        other.load_state_dict(state)
