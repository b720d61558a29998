"""wagle.attribute on a tiny Llama against a hand-written computation of g_f, g_r and the scores."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_llama

from wagle import WeightMask, attribute
from wagle_kernels.scores import inverse_gamma


def tiny_llama(seed=0):
    return random_llama(vocab_size=64, intermediate_size=24, seed=seed)


def batches(seed, n=3, size=2, length=7):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (size, length), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100  # "prompt" tokens carry no loss
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def hand_gradients(model, data):
    """Sum over batches of the gradient of the mean answer-token NLL, written out by hand."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for batch in data:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        targets = batch["labels"][:, 1:]
        valid = targets != -100
        picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        loss = -(picked * valid).sum() / valid.sum()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, _), grad in zip(params.items(), grads, strict=True):
            if grad is not None:
                total[name] += grad
    return total


def naive_top(scores: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    k = math.floor(ratio * flat.numel())
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    out, offset = {}, 0
    for name, s in scores.items():
        out[name] = chosen[offset : offset + s.numel()].view(s.shape)
        offset += s.numel()
    return out


@pytest.mark.parametrize("method", ["wagle", "snip", "gradient"])
def test_attribute_equals_hand_computation(method):
    model = tiny_llama()
    forget, retain = batches(1), batches(2)
    g_f = hand_gradients(model, forget)
    g_r = hand_gradients(model, retain)
    params = {n: p.detach() for n, p in model.named_parameters()}
    gamma = 1e-3
    if method == "wagle":
        scores = {n: ((params[n] - g_r[n] * inverse_gamma(gamma)) * g_f[n]).abs() for n in params}
    elif method == "snip":
        scores = {n: (params[n] * g_f[n]).abs() for n in params}
    else:
        scores = {n: g_f[n].abs() for n in params}
    expected = naive_top(scores, 0.3)
    mask = attribute(model, forget, retain, ratio=0.3, method=method, gamma=gamma, progress=False)
    assert isinstance(mask, WeightMask) and mask.names == list(params)
    differing = sum(int((mask[n] != expected[n]).sum()) for n in params)
    # gradients agree to float rounding; allow a handful of boundary flips, never a count change
    assert differing <= 4
    assert mask.num_selected == math.floor(0.3 * mask.numel)


def test_attribute_leaves_model_state_untouched():
    model = tiny_llama()
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.lm_head.weight.grad = torch.ones_like(model.lm_head.weight)
    model.model.norm.weight.requires_grad_(False)
    attribute(model, batches(1), batches(2), ratio=0.5, progress=False)
    assert model.training
    assert torch.equal(model.lm_head.weight.grad, torch.ones_like(model.lm_head.weight))
    assert not model.model.norm.weight.requires_grad
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_include_exclude_patterns():
    model = tiny_llama()
    mask = attribute(
        model,
        batches(1),
        batches(2),
        ratio=0.5,
        include=["model.layers.*"],
        exclude=["*norm*"],
        progress=False,
    )
    assert mask.names and all(n.startswith("model.layers.") and "norm" not in n for n in mask.names)
    with pytest.raises(ValueError, match="no parameter matches"):
        attribute(model, batches(1), batches(2), ratio=0.5, include=["nothing.*"], progress=False)


def test_baselines_magnitude_random_and_wanda():
    model = tiny_llama()
    magnitude = attribute(model, None, None, ratio=0.25, method="magnitude", progress=False)
    weights = {n: p.detach().abs() for n, p in model.named_parameters()}
    expected = naive_top(weights, 0.25)
    assert all(torch.equal(magnitude[n], expected[n]) for n in weights)
    random = attribute(model, None, ratio=0.25, method="random", seed=5, progress=False)
    assert random.num_selected == magnitude.num_selected
    wanda = attribute(model, batches(1), ratio=0.5, method="wanda", progress=False)
    linear_names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(wanda.names) == sorted(linear_names)
    for name in wanda.names:  # every row keeps exactly half of its inputs
        rows = wanda[name].sum(1)
        assert bool((rows == wanda.shape(name)[1] // 2).all())


def test_wanda_scores_use_input_norms():
    model = tiny_llama()
    data = batches(1, n=1)
    captured = {}
    proj = model.model.layers[0].mlp.down_proj

    def capture(module, inputs, output):
        captured["x"] = inputs[0].detach()

    handle = proj.register_forward_hook(capture)
    with torch.no_grad():
        model(input_ids=data[0]["input_ids"], attention_mask=data[0]["attention_mask"])
    handle.remove()
    norms = captured["x"].reshape(-1, proj.in_features).norm(dim=0)
    scores = proj.weight.detach().abs() * norms
    keep = math.floor(0.3 * proj.in_features)
    expected = torch.zeros_like(scores, dtype=torch.bool)
    expected.scatter_(1, torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :keep], True)
    mask = attribute(model, data, ratio=0.3, method="wanda", progress=False)
    assert torch.equal(mask["model.layers.0.mlp.down_proj.weight"], expected)


def test_attribute_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="retain"):
        attribute(model, batches(1), None, ratio=0.5, method="wagle", progress=False)
    with pytest.raises(ValueError, match="forget"):
        attribute(model, None, batches(1), ratio=0.5, method="snip", progress=False)
    with pytest.raises(ValueError, match="ratio"):
        attribute(model, batches(1), batches(2), ratio=2.0, progress=False)
    with pytest.raises(ValueError, match="method"):
        attribute(model, batches(1), batches(2), ratio=0.5, method="salun", progress=False)
    with pytest.raises(ValueError, match="empty"):
        attribute(model, [], batches(2), ratio=0.5, progress=False)
    with pytest.raises(TypeError, match="input_ids"):
        attribute(model, [{"x": torch.zeros(1)}], batches(2), ratio=0.5, progress=False)


def test_offloaded_forget_gradients_give_the_same_mask():
    model = tiny_llama()
    forget, retain = batches(1), batches(2)
    plain = attribute(model, forget, retain, ratio=0.4, progress=False)
    offloaded = attribute(model, forget, retain, ratio=0.4, offload_gradients=True, progress=False)
    for name in plain:
        assert torch.equal(plain.packed(name), offloaded.packed(name))


@pytest.mark.gpu
def test_gpu_host_gradients_are_streamed_to_the_device():
    from wagle import mask_from_gradients

    model = tiny_llama().cuda()
    forget, retain = batches(1), batches(2)
    plain = attribute(model, forget, retain, ratio=0.4, progress=False)
    offloaded = attribute(model, forget, retain, ratio=0.4, offload_gradients=True, progress=False)
    for name in plain:
        assert torch.equal(plain.packed(name), offloaded.packed(name))
    params = {n: p.detach() for n, p in model.named_parameters()}
    host = {n: torch.randn(p.shape) for n, p in params.items()}
    device = {n: g.cuda() for n, g in host.items()}
    for backend in ("triton", "torch"):
        a = mask_from_gradients(params, host, device, ratio=0.3, backend=backend, host_gradients=True)
        b = mask_from_gradients(params, device, device, ratio=0.3, backend=backend)
        assert all(torch.equal(a.packed(n), b.packed(n)) for n in params)
    with pytest.raises(ValueError, match="host_gradients"):
        mask_from_gradients(params, host, device, ratio=0.3)
