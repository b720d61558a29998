"""A mask records the whole model's parameter layout; applied to a model with parameters it does not
cover (a Llama mask on Qwen2, whose attention has biases; a tied-Llama mask on an untied Llama) it
warns in Python and is refused by the CLI unless --allow-partial-mask. A deliberate subset made for
the same model (include/exclude, Wanda) passes quietly."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import tiny_model, tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from wagle import WeightMask, attribute
from wagle.cli import main
from wagle.data import write_benchmark
from wagle.mask import MaskMismatchError, PartialMaskWarning, model_fingerprint
from wagle.models import save_model

SIZES = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def qwen2():
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tiny_tokenizer()), tie_word_embeddings=False, **SIZES)
    return Qwen2ForCausalLM(config).eval()


def llama(tied: bool):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tiny_tokenizer()), tie_word_embeddings=tied, **SIZES))


def magnitude_mask(model, **kw):
    return attribute(model, None, ratio=0.5, method="magnitude", progress=False, **kw)


def test_the_mask_records_the_model_layout_with_tied_aliases():
    tied, untied = llama(True), llama(False)
    mask = magnitude_mask(tied)
    assert mask.metadata["model_fingerprint"] == model_fingerprint(tied) != model_fingerprint(untied)
    assert '"lm_head.weight": "model.embed_tokens.weight"' in mask.metadata["model_aliases"]
    assert mask.metadata["model_parameters"] == str(len(list(tied.parameters())))


@pytest.mark.parametrize(
    "source, target, frozen",
    [
        (lambda: llama(False), qwen2, "self_attn.q_proj.bias"),
        (lambda: llama(True), lambda: llama(False), "lm_head.weight"),
    ],
)
def test_a_mask_of_another_model_that_leaves_parameters_uncovered_is_flagged(
    tmp_path, source, target, frozen
):
    mask, model = magnitude_mask(source()), target()
    with pytest.warns(PartialMaskWarning, match=f"would stay frozen.*{frozen}"):
        mask.check_compatible(model)
    with pytest.raises(MaskMismatchError, match="another model.*--allow-partial-mask"):
        mask.check_compatible(model, partial="error")
    mask.save(tmp_path / "m.safetensors")
    with pytest.raises(MaskMismatchError, match=frozen):
        WeightMask.load(tmp_path / "m.safetensors", model, partial="error")
    loaded = WeightMask.load(tmp_path / "m.safetensors", model, partial="allow")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded.check_compatible(model)  # accepted for this model: quiet from now on


def test_a_subset_made_for_this_very_model_is_quiet(tmp_path):
    model = llama(False)
    subsets = [magnitude_mask(model, include=["model.layers.*"]), magnitude_mask(model, exclude=["*norm*"])]
    for i, mask in enumerate(subsets):
        mask.save(tmp_path / f"{i}.safetensors")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mask.check_compatible(model)
            WeightMask.load(tmp_path / f"{i}.safetensors", model, partial="error")


def test_a_mask_recording_no_model_is_flagged_when_partial():
    model = llama(False)
    mask = WeightMask.from_dict({"lm_head.weight": torch.ones(model.lm_head.weight.shape, dtype=torch.bool)})
    with pytest.warns(PartialMaskWarning, match="records no model"):
        mask.check_compatible(model)
    full = WeightMask.from_dict(
        {n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full.check_compatible(model)


def test_an_untied_mask_on_a_tied_model_names_the_tie():
    mask = magnitude_mask(llama(False))
    with pytest.raises(MaskMismatchError, match="lm_head.weight is tied to model.embed_tokens.weight"):
        mask.check_compatible(llama(True))


def test_cli_refuses_a_partial_mask_unless_allowed(tmp_path, capsys):
    paths = write_benchmark(str(tmp_path / "data"), num_authors=20)
    save_model(qwen2(), tiny_tokenizer(), str(tmp_path / "qwen2"))
    magnitude_mask(tiny_model()).save(tmp_path / "llama-mask.safetensors")
    args = [
        "unlearn",
        "--model",
        tmp_path / "qwen2",
        "--forget",
        paths["forget10"],
        "--retain",
        paths["retain90"],
        "--mask",
        tmp_path / "llama-mask.safetensors",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--out",
        tmp_path / "u",
        "--no-progress",
    ]
    capsys.readouterr()
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "q_proj.bias" in err and "--allow-partial-mask" in err, err
    assert not (tmp_path / "u" / "model").exists()
    code = main([str(a) for a in [*args, "--allow-partial-mask"]])
    err = capsys.readouterr().err
    assert code == 0 and "PartialMaskWarning" not in err, err
