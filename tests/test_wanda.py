"""Wanda covers every weight matrix a model applies as a linear map: nn.Linear, GPT-2's transposed
Conv1D, a tied lm_head (under the embedding's name) and transformers 5.x mixture-of-experts 3-D
parameters (per expert); what it cannot score is refused by name. Tied names select their parameter."""

from __future__ import annotations

import math

import pytest
import torch

from wagle import attribute
from wagle.attribution import select_parameters
from wagle.errors import UserError


def data(n=2, size=2, length=9, vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (size, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def moe(kind):
    torch.manual_seed(0)
    common = dict(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        num_experts_per_tok=2,
    )
    if kind == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        return MixtralForCausalLM(MixtralConfig(intermediate_size=24, num_local_experts=4, **common)).eval()
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        intermediate_size=24,
        moe_intermediate_size=12,
        shared_expert_intermediate_size=20,
        num_experts=4,
        **common,
    )
    return Qwen2MoeForCausalLM(config).eval()


def captured_inputs(module, model, batches):
    """The positional arguments of every call of ``module`` while ``batches`` run."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args), with_kwargs=True)
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    handle.remove()
    return seen


def top_per_row(scores, keep, axis):
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    order = torch.sort(scores, dim=axis, descending=True, stable=True).indices.narrow(axis, 0, keep)
    return chosen.scatter_(axis, order, True)


def test_gpt2_conv1d_is_ranked_per_output_column_with_its_input_norms():
    model, batches = gpt2(), data()
    conv = model.transformer.h[0].attn.c_attn  # Conv1D: weight (in=16, out=48), y = x @ W + b
    xs = torch.cat([a[0].reshape(-1, 16) for a in captured_inputs(conv, model, batches)])
    scores = conv.weight.detach().abs() * xs.norm(dim=0)[:, None]
    mask = attribute(model, batches, ratio=0.3, method="wanda", progress=False)
    assert torch.equal(
        mask["transformer.h.0.attn.c_attn.weight"], top_per_row(scores, math.floor(0.3 * 16), 0)
    )
    for name in ("transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"):
        fan_in = mask.shape(name)[0]
        assert bool((mask[name].sum(0) == math.floor(0.3 * fan_in)).all()), name


def test_a_tied_lm_head_is_scored_under_the_embedding_name():
    model, batches = gpt2(), data()
    xs = torch.cat([a[0].reshape(-1, 16) for a in captured_inputs(model.lm_head, model, batches)])
    scores = model.transformer.wte.weight.detach().abs() * xs.norm(dim=0)[None, :]
    mask = attribute(model, batches, ratio=0.5, method="wanda", progress=False)
    assert torch.equal(mask["transformer.wte.weight"], top_per_row(scores, 8, 1))
    assert "transformer.wpe.weight" not in mask  # a position table: not a linear map
    assert "lm_head.weight = transformer.wte.weight" in mask.metadata["wanda_tied"]


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_moe_experts_and_routers_are_covered(kind):
    model, batches = moe(kind), data()
    mask = attribute(model, batches, ratio=0.5, method="wanda", progress=False)
    embeddings = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    matrices = [
        n for n, p in model.named_parameters() if p.dim() >= 2 and n.rsplit(".", 1)[0] not in embeddings
    ]
    assert sorted(mask.names) == sorted(matrices)
    for name in mask:  # every output row of every expert keeps half of its inputs
        rows = mask[name].sum(-1)
        assert bool((rows == mask.shape(name)[-1] // 2).all()), name


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_expert_scores_use_each_experts_routed_inputs(kind):
    model, batches = moe(kind), data()
    found = [(n, m) for n, m in model.named_modules() if "gate_up_proj" in m._parameters]
    if not found:
        pytest.skip("this transformers version stores experts as nn.Linear (covered as Linear)")
    name, experts = found[0]
    calls = captured_inputs(experts, model, batches)
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    sq_in = torch.zeros(gate_up.shape[0], gate_up.shape[2])
    sq_mid = torch.zeros(down.shape[0], down.shape[2])
    for args in calls:
        hidden, index = args[0].reshape(-1, gate_up.shape[2]), args[1]
        for e in range(gate_up.shape[0]):
            x = hidden[(index == e).any(-1)]
            gate, up = (x @ gate_up[e].T).chunk(2, dim=-1)
            sq_in[e] += (x * x).sum(0)
            sq_mid[e] += ((torch.nn.functional.silu(gate) * up) ** 2).sum(0)
    assert bool((sq_in.sum(1) > 0).all())  # every expert saw tokens: the per-expert norms differ
    mask = attribute(model, batches, ratio=0.25, method="wanda", progress=False)
    expected_gu = top_per_row(gate_up.abs() * sq_in.sqrt()[:, None, :], gate_up.shape[2] // 4, 2)
    expected_down = top_per_row(down.abs() * sq_mid.sqrt()[:, None, :], down.shape[2] // 4, 2)
    assert torch.equal(mask[f"{name}.gate_up_proj"], expected_gu)
    assert torch.equal(mask[f"{name}.down_proj"], expected_down)


def test_an_unknown_weight_matrix_or_expert_layout_is_refused_by_name():
    model = moe("mixtral")
    found = [(n, m) for n, m in model.named_modules() if "gate_up_proj" in m._parameters]
    if found:
        name, experts = found[0]
        experts.is_transposed = True  # a layout wagle does not score
        with pytest.raises(UserError, match=rf"cannot be scored: \['{name}.gate_up_proj'"):
            attribute(model, data(), ratio=0.5, method="wanda", progress=False)
        experts.is_transposed = False
    model.model.layers[0].extra = torch.nn.Module()
    model.model.layers[0].extra.table = torch.nn.Parameter(torch.zeros(3, 4))
    with pytest.raises(UserError, match=r"model.layers.0.extra.table"):
        attribute(model, data(), ratio=0.5, method="wanda", progress=False)
    mask = attribute(model, data(), ratio=0.5, method="wanda", exclude=["*.extra.*"], progress=False)
    assert "model.layers.0.extra.table" not in mask


def test_tied_names_select_their_parameter():
    model = gpt2()
    assert list(select_parameters(model, include=["lm_head*"])) == ["transformer.wte.weight"]
    assert "transformer.wte.weight" not in select_parameters(model, exclude=["lm_head.*"])
    mask = attribute(model, None, ratio=0.5, method="magnitude", include=["lm_head.weight"], progress=False)
    assert mask.names == ["transformer.wte.weight"]
