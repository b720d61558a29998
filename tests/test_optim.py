"""Masked optimizers against torch.optim on mask-multiplied gradients; layouts, state_dict, in-backward."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import HAS_CUDA

from wagle import WeightMask
from wagle.mask import MaskMismatchError
from wagle.optim import MaskedAdamW, MaskedSGD, StepInBackward

DEVICE = "cuda" if HAS_CUDA else "cpu"
FUSED = [False, True]
SHAPES = {"w": (33, 17), "b": (17,), "one": (1,), "big": (4099,), "empty": (0, 5)}


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).to(dtype).to(DEVICE).requires_grad_() for n, s in SHAPES.items()}


def make_mask(ratio, seed=1):
    g = torch.Generator().manual_seed(seed)
    return WeightMask.from_dict({n: torch.rand(s, generator=g) < ratio for n, s in SHAPES.items()})


def grads(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + step)
    return {n: torch.randn(s, generator=g).to(dtype).to(DEVICE) for n, s in SHAPES.items()}


def run_masked(opt_cls, params, mask, steps, dtype=torch.float32, **kw):
    opt = opt_cls(list(params.items()), mask, **kw)
    for step in range(steps):
        for name, g in grads(step, dtype).items():
            params[name].grad = g.clone().to(params[name].dtype)
        opt.step()
    return opt


def run_reference(ref_cls, params, mask, steps, dtype=torch.float32, **kw):
    """The reference procedure: grad *= mask, then the plain torch optimizer."""
    opt = ref_cls(list(params.values()), **kw)
    for step in range(steps):
        for name, g in grads(step, dtype).items():
            params[name].grad = (g.clone() * mask[name].to(DEVICE)).to(params[name].dtype)
        opt.step()


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("layout", ["dense", "compact"])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
def test_adamw_selected_match_torch_unselected_frozen(fused, layout, ratio):
    mask = make_mask(ratio)
    start = make_params()
    ours = {n: t.detach().clone().requires_grad_() for n, t in start.items()}
    ref = {n: t.detach().clone().requires_grad_() for n, t in start.items()}
    kw = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
    run_masked(MaskedAdamW, ours, mask, 4, state_layout=layout, fused=fused, **kw)
    run_reference(torch.optim.AdamW, ref, mask, 4, foreach=False, **kw)
    for name in SHAPES:
        sel = mask[name].to(DEVICE)
        torch.testing.assert_close(ours[name][sel], ref[name][sel], rtol=1e-5, atol=1e-6)
        assert torch.equal(ours[name][~sel], start[name][~sel]), f"{name}: unselected weights changed"


@pytest.mark.parametrize("fused", FUSED)
def test_adamw_decay_unselected_reproduces_reference_procedure(fused):
    mask = make_mask(0.4)
    start = make_params()
    ours = {n: t.detach().clone().requires_grad_() for n, t in start.items()}
    ref = {n: t.detach().clone().requires_grad_() for n, t in start.items()}
    kw = {"lr": 1e-2, "weight_decay": 0.1}
    run_masked(MaskedAdamW, ours, mask, 3, decay_unselected=True, fused=fused, **kw)
    run_reference(torch.optim.AdamW, ref, mask, 3, foreach=False, **kw)
    for name in SHAPES:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-6)
    sel = mask["w"].to(DEVICE)
    assert not torch.equal(ours["w"][~sel], start["w"][~sel])  # decay moved the frozen weights


@pytest.mark.parametrize("fused", FUSED)
def test_adamw_bf16_params_fp32_state(fused):
    mask = make_mask(0.5)
    start = make_params(torch.bfloat16)
    ours = {n: t.detach().clone().requires_grad_() for n, t in start.items()}
    master = {n: t.detach().float().clone().requires_grad_() for n, t in start.items()}
    run_masked(MaskedAdamW, ours, mask, 3, dtype=torch.bfloat16, lr=1e-2, fused=fused, state_layout="compact")
    run_reference(torch.optim.AdamW, master, mask, 3, dtype=torch.bfloat16, lr=1e-2, foreach=False)
    for name in SHAPES:
        sel = mask[name].to(DEVICE)
        # bf16 storage: one rounding per step of a value of magnitude ~1 -> tolerance 3 bf16 ulps
        torch.testing.assert_close(ours[name][sel].float(), master[name][sel], rtol=0, atol=3 * 2**-7 * 4)
        assert torch.equal(ours[name][~sel], start[name][~sel])


@pytest.mark.parametrize("fused", FUSED)
def test_compact_equals_dense_and_uses_ratio_memory(fused):
    mask = make_mask(0.1)
    start = make_params()
    dense = {n: t.detach().clone().requires_grad_() for n, t in start.items()}
    compact = {n: t.detach().clone().requires_grad_() for n, t in start.items()}
    opt_dense = run_masked(MaskedAdamW, dense, mask, 3, fused=fused, state_layout="dense")
    opt_compact = run_masked(MaskedAdamW, compact, mask, 3, fused=fused, state_layout="compact")
    for name in SHAPES:
        assert torch.equal(dense[name], compact[name])

    def moment_bytes(opt):
        return sum(
            s[k].numel() * s[k].element_size() for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")
        )

    assert moment_bytes(opt_compact) == 2 * 4 * mask.num_selected
    assert moment_bytes(opt_dense) == 2 * 4 * sum(p.numel() for n, p in dense.items() if mask.selected(n) > 0)
    assert opt_compact.state_nbytes() < 0.2 * opt_dense.state_nbytes()


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_state_dict_round_trip_mid_training(fused, layout):
    mask = make_mask(0.5)
    start = make_params()
    a = {n: t.detach().clone().requires_grad_() for n, t in start.items()}
    opt_a = MaskedAdamW(list(a.items()), mask, lr=1e-2, state_layout=layout, fused=fused)
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, step_size=2, gamma=0.5)
    for step in range(5):
        for n, g in grads(step).items():
            a[n].grad = g.clone()
        opt_a.step()
        sched_a.step()
        if step == 1:
            saved = copy.deepcopy(opt_a.state_dict())
            saved_sched = copy.deepcopy(sched_a.state_dict())
            b = {n: t.detach().clone().requires_grad_() for n, t in a.items()}
    opt_b = MaskedAdamW(list(b.items()), mask, lr=1e-2, state_layout=layout, fused=fused)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, step_size=2, gamma=0.5)
    opt_b.load_state_dict(saved)
    sched_b.load_state_dict(saved_sched)
    for step in range(2, 5):
        for n, g in grads(step).items():
            b[n].grad = g.clone()
        opt_b.step()
        sched_b.step()
    for n in SHAPES:
        assert torch.equal(a[n], b[n])
    assert opt_b.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"]


def test_state_dict_for_another_mask_or_layout_is_rejected():
    params = make_params()
    opt = run_masked(MaskedAdamW, params, make_mask(0.5), 1)
    state = opt.state_dict()
    other = MaskedAdamW(list(make_params().items()), make_mask(0.5, seed=7))
    with pytest.raises(MaskMismatchError, match="another mask"):
        other.load_state_dict(state)
    compact = MaskedAdamW(list(make_params().items()), make_mask(0.5), state_layout="compact")
    with pytest.raises(ValueError, match="state_layout"):
        compact.load_state_dict(state)
    with pytest.raises(ValueError, match="wagle"):
        compact.load_state_dict(torch.optim.AdamW(list(make_params().values())).state_dict())


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("accumulation", [1, 3])
def test_step_in_backward_equals_normal_step(fused, accumulation):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(DEVICE)
    twin = copy.deepcopy(model)
    mask = WeightMask.from_dict({n: torch.rand(p.shape) < 0.6 for n, p in model.named_parameters()})
    opt_a = MaskedAdamW(model.named_parameters(), mask, lr=1e-2, fused=fused, state_layout="compact")
    opt_b = MaskedAdamW(twin.named_parameters(), mask, lr=1e-2, fused=fused, state_layout="compact")
    hooks = StepInBackward(opt_b, accumulation_steps=accumulation)
    for step in range(2 * accumulation):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step)).to(DEVICE)
        (model(x).pow(2).mean() / accumulation).backward()
        (twin(x).pow(2).mean() / accumulation).backward()
        if (step + 1) % accumulation == 0:
            opt_a.step()
            opt_a.zero_grad()
            assert all(p.grad is None for p in twin.parameters())
    hooks.remove()
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)


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
)
def test_sgd_matches_torch(fused, layout, kw):
    mask = make_mask(0.4)
    start = make_params()
    ours = {n: t.detach().clone().requires_grad_() for n, t in start.items()}
    ref = {n: t.detach().clone().requires_grad_() for n, t in start.items()}
    run_masked(MaskedSGD, ours, mask, 3, fused=fused, state_layout=layout, **kw)
    run_reference(torch.optim.SGD, ref, mask, 3, foreach=False, **kw)
    for name in SHAPES:
        sel = mask[name].to(DEVICE)
        torch.testing.assert_close(ours[name][sel], ref[name][sel], rtol=1e-5, atol=1e-6)
        assert torch.equal(ours[name][~sel], start[name][~sel])


def test_unmasked_policies_and_errors():
    params = make_params()
    partial = WeightMask.from_dict({"w": torch.rand(SHAPES["w"]) < 0.5})
    with pytest.raises(MaskMismatchError, match="unmasked="):
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
    with pytest.raises(TypeError, match="pairs"):
        MaskedAdamW(list(params.values()), partial)
    with pytest.raises(MaskMismatchError, match="shape"):
        MaskedAdamW([("w", torch.zeros(3, 3, requires_grad=True))], partial)
    with pytest.raises(ValueError, match="state_layout"):
        MaskedAdamW(list(params.items()), partial, unmasked="dense", state_layout="sparse")
    with pytest.raises(ValueError, match="decay_unselected"):
        MaskedAdamW(
            list(params.items()), partial, unmasked="dense", state_layout="compact", decay_unselected=True
        )
    with pytest.raises(ValueError, match="lr"):
        MaskedAdamW(list(params.items()), partial, unmasked="dense", lr=-1)
    complex_param = torch.zeros(SHAPES["w"], dtype=torch.complex64, requires_grad=True)
    with pytest.raises(TypeError, match="floating-point"):
        MaskedAdamW([("w", complex_param)], partial)
    opt = MaskedAdamW([("w", params["w"])], partial)
    params["w"].grad = torch.randn(SHAPES["w"]).to(DEVICE).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


def test_param_groups_and_lr_scheduler():
    params = make_params()
    mask = make_mask(0.5)
    names = list(params)
    opt = MaskedAdamW(
        [
            {"params": [(n, params[n]) for n in names[:2]], "lr": 0.1},
            {"params": [(n, params[n]) for n in names[2:]], "weight_decay": 0.0},
        ],
        mask,
        lr=0.01,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    for n, g in grads(0).items():
        params[n].grad = g
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05) and opt.param_groups[1]["lr"] == pytest.approx(
        0.005
    )
    opt.zero_grad()
    assert all(p.grad is None for p in params.values())


def test_fused_step_is_one_launch_per_dtype_bucket(monkeypatch):
    import wagle.optim.adamw as adamw_module
    from wagle_kernels.multi_tensor import address_table, block_tables

    calls = []
    original = adamw_module.masked_adamw_multi_step_triton

    def counting(params, *args, **kw):
        calls.append(len(params))
        return original(params, *args, **kw)

    monkeypatch.setattr(adamw_module, "masked_adamw_multi_step_triton", counting)
    params = make_params()
    params["b"] = params["b"].detach().to(torch.bfloat16).requires_grad_()
    mask = make_mask(0.5)
    reference = {n: t.detach().clone().requires_grad_() for n, t in params.items()}
    run_masked(MaskedAdamW, params, mask, 2, fused=True, state_layout="compact")
    run_masked(MaskedAdamW, reference, mask, 2, fused=False, state_layout="compact")
    # fp32 tensors share one launch per step, the bf16 one gets its own; unselected/empty ones none
    fp32 = sum(1 for n, p in params.items() if p.dtype == torch.float32 and mask.selected(n) > 0)
    assert fp32 >= 2 and mask.selected("b") > 0
    assert sorted(calls) == sorted([1, 1, fp32, fp32])
    for name in SHAPES:
        # bf16 storage: the fused and torch paths may round the last bit differently (torch's bf16 tolerance)
        tol = {} if params[name].dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(params[name], reference[name], **tol)
    a, b = torch.zeros(3), torch.zeros(5)
    base, offsets = address_table([b, a])
    assert base.data_ptr() == min(a.data_ptr(), b.data_ptr()) and min(offsets) == 0
    assert address_table([a, torch.zeros(2, dtype=torch.float16)]) is None
    owners, indices = block_tables([5, 0, 9], 4, torch.device("cpu"))
    assert owners.tolist() == [0, 0, 2, 2, 2] and indices.tolist() == [0, 1, 0, 1, 2]
