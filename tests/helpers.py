"""Small shared builders for tests: a tiny tokenizer and Llama trained/initialised locally."""

from __future__ import annotations

import functools

from wagle.data.format import format_answer, format_question
from wagle.models import make_tiny_llama, train_tokenizer
from wagle.synthetic.authors import generate_rows


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    rows = generate_rows(num_authors=20, seed=0)
    texts = []
    for row in rows["full"] + rows["general"]:
        texts.append(format_question(row["question"]) + format_answer(row["answer"]))
        texts.append(row["paraphrased_answer"])
        texts.extend(row["perturbed_answer"])
    return train_tokenizer(texts, vocab_size=400)


def tiny_model(seed: int = 0, hidden_size: int = 32):
    return make_tiny_llama(
        tiny_tokenizer(), hidden_size=hidden_size, num_layers=1, num_heads=2, intermediate_size=64, seed=seed
    ).eval()


def random_llama(vocab_size: int = 64, hidden_size: int = 16, intermediate_size: int = 24, seed: int = 0):
    """A 2-layer Llama for random-token tests (no tokenizer needed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0, dropout: float = 0.1):
    """A 1-layer GPT-2 (Conv1D projections, tied lm_head) with dropout, on the tiny tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=128,
        n_embd=32,
        n_layer=1,
        n_head=2,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_moe(seed: int = 0):
    """A 1-layer Qwen2-MoE (4 experts, 2 per token, 3-D expert weights in transformers 5) on the tiny
    tokenizer."""
    import torch
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = Qwen2MoeConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
    )
    return Qwen2MoeForCausalLM(config).eval()
