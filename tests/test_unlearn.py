"""The unlearning loop: masks freeze unselected weights, checkpoint + resume, divergence, bad options."""

from __future__ import annotations

import math
import os

import pytest
import torch
from helpers import tiny_model, tiny_tokenizer

from wagle import UnlearningDiverged, WeightMask, attribute, unlearn
from wagle.data import generate_rows, make_dataloader
from wagle.mask import MaskMismatchError
from wagle.objectives import OBJECTIVES, GradDiff, Objective, mean_nll, objective_options
from wagle.unlearning.examples import micro_batch_indices

ROWS = generate_rows(num_authors=20)
FORGET, RETAIN = ROWS["forget10"][:6], ROWS["retain90"][:12]
KW = {"steps": 3, "lr": 1e-3, "batch_size": 2, "progress": False}


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", list(OBJECTIVES))
def test_every_method_runs_and_changes_weights(method):
    model, tok = tiny_model(), tiny_tokenizer()
    before = snapshot(model)
    result = unlearn(model, FORGET, RETAIN, tokenizer=tok, method=method, **KW)
    assert len(result.history) == 3 and all(math.isfinite(h["loss"]) for h in result.history)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


class _ScaledAscent(Objective):
    """A throwaway objective: L = -scale * NLL_f."""

    name = "scaled_ascent"
    uses_retain = False

    def __init__(self, scale: float = 2.0, beta: float = 0.5):
        self.scale, self.beta = scale, beta

    def loss(self, model, forget, retain):
        nll = mean_nll(model, forget)
        return -self.scale * nll, {"nll_forget": float(nll.detach())}


def test_a_registered_objective_is_one_class_and_one_entry(monkeypatch):
    """Registering an Objective subclass is all it takes: unlearn runs it by name, its settings enter
    the fingerprint, and shared options (beta) reach it through objective_options."""
    monkeypatch.setitem(OBJECTIVES, "scaled_ascent", _ScaledAscent)
    assert objective_options("scaled-ascent") == ("scale", "beta")
    assert "beta" in objective_options("npo") and "beta" not in objective_options("grad_diff")
    runs = {}
    for scale in (1.0, 2.0):
        model, tok = tiny_model(), tiny_tokenizer()
        kw = {"objective_kwargs": {"scale": scale}, **KW}
        result = unlearn(model, FORGET, RETAIN, tokenizer=tok, method="scaled_ascent", **kw)
        runs[scale] = snapshot(model)
        assert len(result.history) == 3 and all(h["loss"] < 0 for h in result.history)
    reference, tok = tiny_model(), tiny_tokenizer()
    unlearn(reference, FORGET, RETAIN, tokenizer=tok, method="grad_ascent", **KW)
    for name, p in reference.named_parameters():  # scale 1 is gradient ascent
        assert torch.equal(runs[1.0][name], p)
    assert any(not torch.equal(runs[1.0][n], runs[2.0][n]) for n in runs[1.0])


@pytest.mark.parametrize("layout", ["compact", "dense"])
def test_mask_leaves_unselected_weights_bit_identical(layout):
    model, tok = tiny_model(), tiny_tokenizer()
    mask = attribute(
        model,
        make_dataloader(FORGET, tok, batch_size=3),
        make_dataloader(RETAIN, tok, batch_size=3),
        ratio=0.3,
        progress=False,
    )
    before = snapshot(model)
    unlearn(
        model,
        FORGET,
        RETAIN,
        tokenizer=tok,
        method="npo",
        mask=mask,
        state_layout=layout,
        weight_decay=0.1,
        **KW,
    )
    changed = 0
    for name, param in model.named_parameters():
        selected = mask[name]
        assert torch.equal(param[~selected], before[name][~selected]), name
        changed += int((param[selected] != before[name][selected]).sum())
    assert changed > 0


def test_parameters_outside_the_mask_are_frozen():
    model, tok = tiny_model(), tiny_tokenizer()
    names = [n for n, _ in model.named_parameters()]
    mask = WeightMask.from_dict(
        {names[0]: torch.ones_like(dict(model.named_parameters())[names[0]], dtype=torch.bool)}
    )
    before = snapshot(model)
    unlearn(model, FORGET, RETAIN, tokenizer=tok, method="grad_diff", mask=mask, **KW)
    assert not torch.equal(before[names[0]], dict(model.named_parameters())[names[0]])
    for name in names[1:]:
        assert torch.equal(before[name], dict(model.named_parameters())[name])
    assert all(p.requires_grad for p in model.parameters())  # flags restored


@pytest.mark.parametrize("method", ["npo", "grad_diff"])
def test_checkpoint_and_resume_equal_an_uninterrupted_run(tmp_path, method):
    tok = tiny_tokenizer()
    kw = {**KW, "steps": 6, "grad_accum": 2, "warmup_ratio": 0.2}
    straight = tiny_model()
    unlearn(straight, FORGET, RETAIN, tokenizer=tok, method=method, **kw)

    interrupted = tiny_model()
    folder = str(tmp_path / "ckpt")
    with pytest.raises(KeyboardInterrupt):
        unlearn(
            interrupted,
            FORGET,
            RETAIN,
            tokenizer=tok,
            method=_Interrupting(method, after=7),
            checkpoint_dir=folder,
            checkpoint_every=2,
            **kw,
        )
    assert sorted(d for d in os.listdir(folder) if d.startswith("checkpoint-")) == ["checkpoint-000002"]
    resumed = tiny_model()  # the same starting weights (another model is refused: see test_resume.py)
    result = unlearn(
        resumed, FORGET, RETAIN, tokenizer=tok, method=method, checkpoint_dir=folder, checkpoint_every=2, **kw
    )
    assert result.resumed_from == 2
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert not [d for d in os.listdir(folder) if d.startswith(".tmp")]


class _Interrupting(GradDiff):
    """Wraps a named objective and raises KeyboardInterrupt on its ``after``-th loss call."""

    def __init__(self, method: str, after: int):
        from wagle.objectives import make_objective

        self.inner = make_objective(method)
        self.name = self.inner.name
        self.forget_answer_column = self.inner.forget_answer_column
        self.calls, self.after = 0, after

    def prepare(self, *args, **kw):
        self.inner.prepare(*args, **kw)

    def loss(self, model, forget, retain):
        self.calls += 1
        if self.calls == self.after:
            raise KeyboardInterrupt
        return self.inner.loss(model, forget, retain)

    def settings(self):
        return self.inner.settings()

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def test_nan_loss_stops_and_names_the_last_good_checkpoint(tmp_path):
    model, tok = tiny_model(), tiny_tokenizer()

    class Exploding(GradDiff):
        calls = 0

        def loss(self, model, forget, retain):
            Exploding.calls += 1
            loss, stats = super().loss(model, forget, retain)
            return (loss * float("nan") if Exploding.calls > 2 else loss), stats

    folder = str(tmp_path / "ckpt")
    with pytest.raises(UnlearningDiverged, match="checkpoint-000002"):
        unlearn(
            model,
            FORGET,
            RETAIN,
            tokenizer=tok,
            method=Exploding(),
            checkpoint_dir=folder,
            checkpoint_every=1,
            **{**KW, "steps": 5},
        )
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_batch_order_is_a_function_of_the_step():
    seen = [micro_batch_indices(j, 5, 3, seed=1) for j in range(5)]
    flat = [i for batch in seen for i in batch]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))
    assert micro_batch_indices(3, 5, 3, seed=1) == seen[3]


def test_bad_options():
    model, tok = tiny_model(), tiny_tokenizer()
    with pytest.raises(ValueError, match="steps"):
        unlearn(model, FORGET, RETAIN, tokenizer=tok, steps=0)
    with pytest.raises(ValueError, match="lr"):
        unlearn(model, FORGET, RETAIN, tokenizer=tok, lr=-1.0)
    with pytest.raises(ValueError, match="forget set is empty"):
        unlearn(model, [], RETAIN, tokenizer=tok, **KW)
    with pytest.raises(ValueError, match="retain"):
        unlearn(model, FORGET, None, tokenizer=tok, method="npo", **KW)
    with pytest.raises(ValueError, match="unknown unlearning method"):
        unlearn(model, FORGET, RETAIN, tokenizer=tok, method="dpo", **KW)
    other = WeightMask.from_dict({"not.a.param": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(MaskMismatchError):
        unlearn(model, FORGET, RETAIN, tokenizer=tok, mask=other, **KW)
    with pytest.raises(ValueError, match="'question' and 'answer'"):
        unlearn(model, [{"prompt": "x"}], RETAIN, tokenizer=tok, **KW)


def test_bf16_training_with_fp32_optimizer_state():
    model, tok = tiny_model(), tiny_tokenizer()
    mask = attribute(
        model, make_dataloader(FORGET, tok, batch_size=3), None, ratio=0.5, method="snip", progress=False
    )
    model.to(torch.bfloat16)
    before = snapshot(model)
    result = unlearn(
        model, FORGET, RETAIN, tokenizer=tok, method="grad_diff", mask=mask, precision="bf16", **KW
    )
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(math.isfinite(h["loss"]) for h in result.history)
    for name, param in model.named_parameters():
        assert torch.equal(param[~mask[name]], before[name][~mask[name]])


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_step_in_backward_matches_the_normal_step(state_dtype):
    tok = tiny_tokenizer()
    mask = attribute(
        tiny_model(),
        make_dataloader(FORGET, tok, batch_size=3),
        None,
        ratio=0.5,
        method="snip",
        progress=False,
    )
    kw = {**KW, "grad_accum": 2, "max_grad_norm": 0.0, "mask": mask, "state_dtype": state_dtype}
    normal, hooked = tiny_model(), tiny_model()
    unlearn(normal, FORGET, RETAIN, tokenizer=tok, method="grad_diff", **kw)
    result = unlearn(hooked, FORGET, RETAIN, tokenizer=tok, method="grad_diff", step_in_backward=True, **kw)
    assert len(result.history) == KW["steps"]
    for (name, a), b in zip(normal.named_parameters(), hooked.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert all(p.grad is None for p in hooked.parameters())
