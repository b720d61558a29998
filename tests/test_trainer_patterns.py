"""The masked Trainer on the patterns of Trainer-based unlearning frameworks, against an explicit masked
computation (stock subclass + masked gradients + unselected entries put back, tests/trainer_patterns.py):
same trainable set, same decay groups, same clipping semantics; only which weights move differs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from helpers import tiny_model  # noqa: E402
from trainer_patterns import (  # noqa: E402
    GradDiffLike,
    NPOLike,
    OwnOptimizer,
    RegexTrainable,
    assert_masked_update,
    paired_collator,
    paired_dataset,
    random_mask,
    reference_of,
    run,
    training_args,
)

from wagle import MaskMismatchError  # noqa: E402
from wagle.integrations import masked  # noqa: E402
from wagle.optim import MaskedAdamW, MaskedSGD  # noqa: E402


def decay_names(trainer) -> set[str]:
    return set(trainer.get_decay_parameter_names(trainer.model))


def group_names(optimizer) -> list[set[str]]:
    return [set(group["param_names"]) for group in optimizer.param_groups]


def test_npo_like_with_reference_model_and_accumulation_equals_masked_reference(tmp_path):
    mask = random_mask(tiny_model(), seed=1)
    kw = {"gradient_accumulation_steps": 2, "max_grad_norm": 1.0}
    ours, start, after = run(masked(NPOLike), tmp_path / "a", mask, **kw)
    _, _, expected = run(reference_of(NPOLike, mask), tmp_path / "b", **kw)
    assert_masked_update(mask, start, after, expected)
    optimizer = ours.wagle_optimizer
    assert isinstance(optimizer, MaskedAdamW) and optimizer.state_layout == "compact"
    # the Trainer's own decay groups: no decay for the norm weights
    decay = decay_names(ours)
    assert group_names(optimizer) == [decay, set(n for n, _ in ours.model.named_parameters()) - decay]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert any("norm" in n for n in group_names(optimizer)[1])
    assert all(not p.requires_grad for p in ours.ref_model.parameters())


@pytest.mark.parametrize("clip_mode", ["mask_then_clip", "clip_then_mask"])
def test_regex_trainable_set_survives(tmp_path, clip_mode):
    regex = (r"model\.layers\.0\.mlp\.down_proj\.weight", r"model\.layers\.0\.input_layernorm\.weight")
    mask = random_mask(tiny_model(), seed=2)
    options = {"trainable_params_regex": regex}
    ours, start, after = run(
        masked(RegexTrainable),
        tmp_path / "a",
        mask,
        max_grad_norm=0.05,
        trainer_kwargs={**options, "wagle_clip_mode": clip_mode},
    )
    _, _, expected = run(
        reference_of(RegexTrainable, mask, clip_mode),
        tmp_path / "b",
        max_grad_norm=0.05,
        trainer_kwargs=options,
    )
    trained = {"model.layers.0.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight"}
    assert_masked_update(mask, start, after, expected, trained=trained)
    assert set().union(*group_names(ours.wagle_optimizer)) == trained
    requires = {n for n, p in ours.model.named_parameters() if p.requires_grad}
    # mask_then_clip: only trained tensors compute gradients; clip_then_mask keeps the framework's flags
    assert requires == (trained if clip_mode == "mask_then_clip" else set(start))


def test_clipping_semantics_against_explicit_computation(tmp_path):
    """SGD makes the update proportional to the clip coefficient: the two semantics differ, and each
    equals its explicit computation."""
    mask = random_mask(tiny_model(), seed=3)
    kw = {"optim": "sgd", "learning_rate": 0.5, "max_grad_norm": 0.05, "weight_decay": 0.0}
    results = {}
    for mode in ("mask_then_clip", "clip_then_mask"):
        ours, start, after = run(
            masked(GradDiffLike), tmp_path / mode, mask, trainer_kwargs={"wagle_clip_mode": mode}, **kw
        )
        assert isinstance(ours.wagle_optimizer, MaskedSGD)
        _, _, expected = run(reference_of(GradDiffLike, mask, mode), tmp_path / f"{mode}-ref", **kw)
        assert_masked_update(mask, start, after, expected)
        results[mode] = after
    assert any(not torch.allclose(results["mask_then_clip"][n], results["clip_then_mask"][n]) for n in start)


def test_clipping_off(tmp_path):
    mask = random_mask(tiny_model(), seed=4)
    ours, start, after = run(masked(GradDiffLike), tmp_path / "a", mask, max_grad_norm=0.0)
    _, _, expected = run(reference_of(GradDiffLike, mask), tmp_path / "b", max_grad_norm=0.0)
    assert_masked_update(mask, start, after, expected)


def test_gradient_checkpointing_with_frozen_embeddings(tmp_path):
    """Only decoder-layer weights selected: the embeddings are frozen, and reentrant checkpointing
    (transformers 4.x's default) would get no gradient through the layers without the fix."""
    mask = random_mask(tiny_model(), seed=5, skip=("embed_tokens", "lm_head", r"model\.norm"))
    gc = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}}
    ours, start, after = run(masked(GradDiffLike), tmp_path / "a", mask, **gc)
    assert not ours.model.get_input_embeddings().weight.requires_grad
    _, _, expected = run(reference_of(GradDiffLike, mask), tmp_path / "b")
    assert_masked_update(mask, start, after, expected)
    assert any(not torch.equal(after[n], start[n]) for n in start if ".layers.0.self_attn." in n)


def test_own_torch_optimizer_is_converted_with_its_groups(tmp_path):
    mask = random_mask(tiny_model(), seed=6)
    ours, start, after = run(masked(OwnOptimizer), tmp_path / "a", mask)
    _, _, expected = run(reference_of(OwnOptimizer, mask), tmp_path / "b")
    assert_masked_update(mask, start, after, expected)
    groups = ours.wagle_optimizer.param_groups
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-2, 0.05), (2e-2, 0.0)]
    assert all("norm" in n for n in groups[1]["param_names"])


def test_checkpoint_and_resume_equal_an_uninterrupted_run(tmp_path):
    mask = random_mask(tiny_model(), seed=7)
    kw = {
        "max_steps": 4,
        "save_strategy": "steps",
        "save_steps": 2,
        "save_only_model": False,
        "lr_scheduler_type": "linear",
        "max_grad_norm": 0.5,
    }
    _, start, uninterrupted = run(masked(NPOLike), tmp_path / "a", mask, **kw)
    checkpoint = os.path.join(tmp_path / "a", "checkpoint-2")
    assert os.path.isfile(os.path.join(checkpoint, "optimizer.pt"))
    model = tiny_model()
    trainer = masked(NPOLike)(
        model=model,
        args=training_args(tmp_path / "b", **kw),
        train_dataset=paired_dataset(),
        data_collator=paired_collator,
        wagle_mask=mask,
    )
    # transformers 4.x reads rng_state.pth with torch.load's default weights_only=True, which refuses the
    # numpy RNG state on torch >= 2.6 unless its types are allow-listed (newer transformers do this)
    numpy_state = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(numpy_state):
        trainer.train(resume_from_checkpoint=checkpoint)
    resumed = {n: p.detach() for n, p in model.named_parameters()}
    for name in start:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    optimizer = trainer.wagle_optimizer
    steps = {float(state["step"]) for state in optimizer.state.values()}
    assert steps == {4.0}
    assert all(state["exp_avg"].dim() == 1 for state in optimizer.state.values())  # compact layout
    other = tiny_model()
    wrong = masked(NPOLike)(
        model=other,
        args=training_args(tmp_path / "c", **kw),
        train_dataset=paired_dataset(),
        data_collator=paired_collator,
        wagle_mask=random_mask(other, seed=8),
    )
    with (
        torch.serialization.safe_globals(numpy_state),
        pytest.raises(MaskMismatchError, match="another mask"),
    ):
        wrong.train(resume_from_checkpoint=checkpoint)
