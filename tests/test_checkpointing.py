"""Activation checkpointing in attribution and unlearning: active (each decoder layer runs again in
backward), same gradients as without it, and the model's own setting restored afterwards."""

from __future__ import annotations

import pytest
import torch
from helpers import random_llama, tiny_model, tiny_tokenizer

from wagle import attribute, unlearn
from wagle.data import generate_rows
from wagle.models import activation_checkpointing
from wagle.models.checkpointing import _enable, checkpointed_modules


def batches(seed, n=2, size=2, length=9):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (size, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


class LayerCalls:
    """Counts forward runs of the first decoder layer's MLP (again when its layer is recomputed).
    The instance's forward is wrapped: module hooks are not re-run by every recompute."""

    def __init__(self, model):
        self.module = model.model.layers[0].mlp
        self.count = 0
        original = self.module.forward

        def forward(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        self.module.forward = forward

    def remove(self):
        del self.module.forward


def test_attribution_recomputes_layers_and_gives_the_same_mask():
    model = random_llama(vocab_size=64, seed=3)
    forget, retain = batches(1), batches(2)
    calls = LayerCalls(model)
    plain = attribute(model, forget, retain, ratio=0.3, progress=False)
    plain_calls, calls.count = calls.count, 0
    checkpointed = attribute(model, forget, retain, ratio=0.3, gradient_checkpointing=True, progress=False)
    calls.remove()
    assert plain_calls == 4 and calls.count == 8  # 4 batches; each layer runs again in backward
    for name in plain:
        assert torch.equal(plain.packed(name), checkpointed.packed(name)), name
    assert not model.training and not checkpointed_modules(model)
    assert not any(m.training for m in model.modules())


def test_unlearning_with_checkpointing_equals_without():
    tok = tiny_tokenizer()
    rows = generate_rows(num_authors=20, seed=0)
    kw = {"tokenizer": tok, "method": "grad_diff", "steps": 2, "lr": 1e-3, "batch_size": 2, "progress": False}
    plain, checkpointed = tiny_model(), tiny_model()
    unlearn(plain, rows["forget10"], rows["retain90"], **kw)
    calls = LayerCalls(checkpointed)
    unlearn(checkpointed, rows["forget10"], rows["retain90"], gradient_checkpointing=True, **kw)
    calls.remove()
    assert calls.count == 2 * 2 * 2  # 2 steps x (forget + retain forward) x (forward + recompute)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not checkpointed_modules(checkpointed)


def test_an_enabled_setting_is_kept_and_unsupported_models_are_refused():
    model = random_llama(vocab_size=64)
    _enable(model)
    with activation_checkpointing(model):
        assert checkpointed_modules(model)
    assert checkpointed_modules(model)
    refused = activation_checkpointing(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="gradient_checkpointing: Linear does not support"):
        refused.__enter__()
    with activation_checkpointing(torch.nn.Linear(2, 2), enabled=False):
        pass


def dropout_model(kind: str):
    """Tiny OPT / GPT-2 with dropout 0.1 everywhere (OPT applies it from the layer's own flag)."""
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    torch.manual_seed(5)
    if kind == "opt":
        config = OPTConfig(
            vocab_size=64,
            hidden_size=16,
            ffn_dim=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
            word_embed_proj_dim=16,
            dropout=0.1,
            attention_dropout=0.1,
        )
        return OPTForCausalLM(config).eval()
    config = GPT2Config(
        vocab_size=64,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=32,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
    )
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("kind", ["opt", "gpt2"])
def test_checkpointed_attribution_keeps_dropout_off(kind):
    model = dropout_model(kind)
    forget, retain = batches(1), batches(2)
    plain = attribute(model, forget, retain, ratio=0.3, progress=False)
    runs = [
        attribute(model, forget, retain, ratio=0.3, gradient_checkpointing=True, progress=False)
        for _ in range(2)
    ]
    for mask in runs:
        differing = sum(int((plain[n] != mask[n]).sum()) for n in plain)
        assert differing == 0
    assert not any(m.training for m in model.modules()) and not checkpointed_modules(model)
