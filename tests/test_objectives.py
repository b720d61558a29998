"""Each objective's loss against its formula written out by hand on a tiny batch."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import random_llama

from wagle.objectives import (
    NPO,
    RMU,
    GradAscent,
    GradDiff,
    PreferenceOptimization,
    SimNPO,
    make_objective,
    refusal_for,
)


def tiny_llama(seed=0):
    return random_llama(vocab_size=50, intermediate_size=32, seed=seed)


def batch(seed, size=3, length=8, start_index=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (size, length), generator=g)
    attention = torch.ones_like(ids)
    attention[0, -2:] = 0  # right padding on one row
    labels = ids.clone()
    labels[:, :3] = -100
    labels[attention == 0] = -100
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "labels": labels,
        "example_index": torch.arange(start_index, start_index + size),
    }


def per_example_logp(model, b):
    """sum over answer tokens of log p(token), one python loop per example and position."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
    out, counts = [], []
    for i in range(b["input_ids"].shape[0]):
        total, count = 0.0, 0
        for t in range(1, b["input_ids"].shape[1]):
            if b["labels"][i, t] != -100:
                total = total + torch.log_softmax(logits[i, t - 1], -1)[b["labels"][i, t]]
                count += 1
        out.append(total)
        counts.append(count)
    return torch.stack(out), torch.tensor(counts)


def token_mean_nll(model, b):
    logp, count = per_example_logp(model, b)
    return -logp.sum() / count.sum()


def test_grad_ascent_and_grad_diff():
    model, f, r = tiny_llama(), batch(1), batch(2)
    loss, _ = GradAscent()(model, f, None)
    assert torch.allclose(loss, -token_mean_nll(model, f), atol=1e-5)
    # the mean-token NLL equals HF's own loss
    hf = model(input_ids=f["input_ids"], attention_mask=f["attention_mask"], labels=f["labels"]).loss
    assert torch.allclose(-loss, hf, atol=1e-5)
    loss, stats = GradDiff(retain_weight=0.5)(model, f, r)
    assert torch.allclose(loss, -token_mean_nll(model, f) + 0.5 * token_mean_nll(model, r), atol=1e-5)
    assert set(stats) == {"nll_forget", "nll_retain"}


def test_npo_formula_and_reference_equals_frozen_copy():
    model, f, r = tiny_llama(), batch(1), batch(2)
    frozen = copy.deepcopy(model)
    objective = NPO(beta=0.1, retain_weight=1.0)
    objective.prepare(model, [f], [r], progress=False)
    # change the model: the precomputed reference must still equal the frozen starting copy
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    loss, _ = objective(model, f, r)
    logp, _ = per_example_logp(model, f)
    logp_ref, _ = per_example_logp(frozen, f)
    assert torch.allclose(objective.reference_logprob, logp_ref.detach(), atol=1e-5)
    expected = -(2 / 0.1) * F.logsigmoid(-0.1 * (logp - logp_ref)).mean() + token_mean_nll(model, r)
    assert torch.allclose(loss, expected, atol=1e-4)
    # at the start the log-ratio is 0: the forget term is (2/beta) * log 2
    fresh = NPO(beta=0.1, retain_weight=0.0)
    fresh.prepare(frozen, [f], None, progress=False)
    start_loss, _ = fresh(frozen, f, None)
    assert math.isclose(float(start_loss.detach()), 20 * math.log(2), rel_tol=1e-5)


def test_npo_state_round_trip():
    model, f = tiny_llama(), batch(1)
    objective = NPO()
    objective.prepare(model, [f], None, progress=False)
    restored = NPO()
    restored.load_state_dict(objective.state_dict())
    assert torch.equal(restored.reference_logprob, objective.reference_logprob)
    with pytest.raises(RuntimeError, match="prepare"):
        NPO()(model, f, None)


def test_simnpo_formula():
    model, f, r = tiny_llama(), batch(1), batch(2)
    loss, _ = SimNPO(beta=4.5, delta=0.2)(model, f, r)
    logp, count = per_example_logp(model, f)
    expected = -(2 / 4.5) * F.logsigmoid(4.5 * (-logp / count) - 0.2).mean() + token_mean_nll(model, r)
    assert torch.allclose(loss, expected, atol=1e-4)


def test_po_is_refusal_nll_plus_retain():
    model, f, r = tiny_llama(), batch(1), batch(2)
    loss, _ = PreferenceOptimization()(model, f, r)
    assert torch.allclose(loss, token_mean_nll(model, f) + token_mean_nll(model, r), atol=1e-5)
    assert refusal_for(3) == refusal_for(3) and isinstance(refusal_for(3), str)
    assert len({refusal_for(i) for i in range(50)}) > 3


def test_rmu_formula():
    model, f, r = tiny_llama(), batch(1), batch(2, start_index=10)
    objective = RMU(layer=0, steering_coef=2.0, alpha=10.0, seed=1)
    objective.prepare(model, [f], [r], progress=False)
    frozen = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    loss, _ = objective(model, f, r)

    def layer_out(m, b):
        return m(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True
        ).hidden_states[1]

    u = objective.control
    assert math.isclose(float(u.norm()), 1.0, rel_tol=1e-5)
    hf, hr, hr0 = layer_out(model, f), layer_out(model, r), layer_out(frozen, r)
    mf, mr = f["attention_mask"].bool(), r["attention_mask"].bool()
    forget = ((hf - 2.0 * u) ** 2)[mf].mean()
    retain = ((hr - hr0) ** 2)[mr].mean()
    assert torch.allclose(loss, forget + 10.0 * retain, atol=1e-4)


def test_make_objective_names_and_errors():
    assert isinstance(make_objective("GradDiff"), GradDiff)
    assert isinstance(make_objective("npo", beta=0.2), NPO)
    with pytest.raises(ValueError, match="unknown unlearning method"):
        make_objective("dpo")
    with pytest.raises(ValueError, match="beta"):
        NPO(beta=0)
