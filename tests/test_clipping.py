"""Masked gradient clipping (wagle.optim.clipping) against explicit computations, and wagle.unlearn's
clip_mode."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_model, tiny_tokenizer

from wagle import MaskedAdamW, MaskedSGD, WeightMask, unlearn
from wagle.data import generate_rows
from wagle.data.batching import collate_examples, pad_id_of
from wagle.objectives import make_objective
from wagle.optim import clip_masked_grad_norm_, mask_gradients_
from wagle.unlearning.examples import encode_examples, micro_batch_indices

ROWS = generate_rows(num_authors=20)
FORGET = ROWS["forget10"][:4]


def setup(seed: int = 0, scale: float = 1.0):
    """Three parameters (partly, fully and not selected) plus one without a mask entry, with gradients."""
    g = torch.Generator().manual_seed(seed)
    params = {
        n: torch.nn.Parameter(torch.randn(shape, generator=g))
        for n, shape in {"a": (7, 5), "b": (11,), "c": (3, 4), "free": (6,)}.items()
    }
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=g) * scale
    mask = WeightMask.from_dict(
        {
            "a": torch.rand(7, 5, generator=g) < 0.4,
            "b": torch.ones(11, dtype=torch.bool),
            "c": torch.zeros(3, 4, dtype=torch.bool),
        }
    )
    optimizer = MaskedSGD(list(params.items()), mask, lr=0.1, unmasked="freeze")
    return params, mask, optimizer


def test_mask_then_clip_uses_the_norm_of_the_selected_entries():
    params, mask, optimizer = setup(scale=3.0)
    grads = {n: p.grad.clone() for n, p in params.items()}
    selected = {n: grads[n] * mask[n] for n in ("a", "b", "c")}
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in selected.values()))
    max_norm = 0.5 * norm
    returned = clip_masked_grad_norm_(optimizer, max_norm, "mask_then_clip")
    assert returned.item() == pytest.approx(norm, rel=1e-6)
    coef = max_norm / (norm + 1e-6)
    for name in ("a", "b", "c"):
        torch.testing.assert_close(params[name].grad, selected[name] * coef, rtol=1e-6, atol=1e-7)
    assert not params["c"].grad.any()  # a tensor without a selected weight contributes nothing
    assert torch.equal(params["free"].grad, torch.zeros_like(grads["free"]))  # frozen: not in the norm


def test_clip_then_mask_uses_the_full_gradients():
    params, mask, optimizer = setup(scale=3.0)
    grads = {n: p.grad.clone() for n, p in params.items()}
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    returned = clip_masked_grad_norm_(optimizer, 1.0, "clip_then_mask")
    assert returned.item() == pytest.approx(norm, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(params[name].grad, grad * (1.0 / (norm + 1e-6)), rtol=1e-6, atol=1e-7)
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer.step()  # and the update then uses only the selected entries
    for name in ("a", "b", "c"):
        assert torch.equal(params[name].detach()[~mask[name]], before[name][~mask[name]])


def test_no_clipping_below_the_threshold_and_bad_mode():
    params, _, optimizer = setup(scale=1e-3)
    grads = {n: p.grad.clone() for n, p in params.items()}
    clip_masked_grad_norm_(optimizer, 10.0, "clip_then_mask")
    assert all(torch.equal(params[n].grad, grads[n]) for n in grads)
    with pytest.raises(ValueError, match="clip_mode"):
        clip_masked_grad_norm_(optimizer, 1.0, "clip")


def test_mask_gradients_skips_fully_selected_and_dense_parameters():
    params, mask, _ = setup()
    optimizer = MaskedAdamW(list(params.items()), mask, unmasked="dense")
    grads = {n: p.grad.clone() for n, p in params.items()}
    assert mask_gradients_(optimizer) == 2  # "a" (partly selected) and "c" (nothing selected)
    assert torch.equal(params["b"].grad, grads["b"]) and torch.equal(params["free"].grad, grads["free"])
    assert torch.equal(params["a"].grad, grads["a"] * mask["a"])


def _first_step_grads(model, tok, mask, batch_size):
    """Gradients of grad_ascent on wagle.unlearn's first micro-batch (explicitly rebuilt)."""
    examples = encode_examples(FORGET, tok, role="forget")
    batch = collate_examples(
        [examples[i] for i in micro_batch_indices(0, len(examples), batch_size, 0)], pad_id_of(tok)
    )
    model.train()
    loss, _ = make_objective("grad_ascent")(model, batch, None)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if n in mask}


@pytest.mark.parametrize("clip_mode", ["mask_then_clip", "clip_then_mask"])
def test_unlearn_clip_mode_norm_equals_explicit_computation(clip_mode):
    tok = tiny_tokenizer()
    names = [n for n, _ in tiny_model().named_parameters()]
    g = torch.Generator().manual_seed(0)
    entries = {n: torch.rand(p.shape, generator=g) < 0.3 for n, p in tiny_model().named_parameters()}
    entries[names[1]] = torch.zeros_like(entries[names[1]])  # one fully unselected tensor
    del entries[names[-1]]  # and one without a mask entry (frozen in both modes)
    mask = WeightMask.from_dict(entries)
    grads = _first_step_grads(tiny_model(), tok, mask, batch_size=2)
    if clip_mode == "mask_then_clip":
        expected = math.sqrt(sum(float((g[mask[n]].double() ** 2).sum()) for n, g in grads.items()))
    else:
        expected = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = unlearn(
        model,
        FORGET,
        None,
        tokenizer=tok,
        method="grad_ascent",
        mask=mask,
        steps=2,
        lr=1e-3,
        batch_size=2,
        max_grad_norm=1e-3,
        clip_mode=clip_mode,
        progress=False,
    )
    assert result.history[0]["grad_norm"] == pytest.approx(expected, rel=1e-5)
    for name, param in model.named_parameters():
        keep = ~mask[name] if name in mask else torch.ones_like(param, dtype=torch.bool)
        assert torch.equal(param.detach()[keep], before[name][keep]), name
        assert param.requires_grad  # restored afterwards


def test_unlearn_clip_modes_differ_and_are_validated():
    tok = tiny_tokenizer()
    g = torch.Generator().manual_seed(1)
    mask = WeightMask.from_dict(
        {n: torch.rand(p.shape, generator=g) < 0.3 for n, p in tiny_model().named_parameters()}
    )
    kw = {"method": "grad_ascent", "mask": mask, "steps": 2, "lr": 1e-3, "batch_size": 2, "progress": False}
    norms = {}
    for mode in ("mask_then_clip", "clip_then_mask"):
        norms[mode] = unlearn(tiny_model(), FORGET, None, tokenizer=tok, clip_mode=mode, **kw).history[0][
            "grad_norm"
        ]
    assert norms["mask_then_clip"] < norms["clip_then_mask"]
    with pytest.raises(ValueError, match="clip_mode"):
        unlearn(tiny_model(), FORGET, None, tokenizer=tok, clip_mode="none", **kw)
    with pytest.raises(ValueError, match="clip_mode.*step_in_backward"):
        unlearn(
            tiny_model(), FORGET, None, tokenizer=tok, clip_mode="clip_then_mask", step_in_backward=True, **kw
        )
