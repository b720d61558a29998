"""Resuming only the same run: a checkpoint folder remembers the run's fingerprint (starting weights,
mask, data, method and every setting) and a rerun with anything else is refused, naming what changed."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from helpers import tiny_model, tiny_tokenizer

from wagle import WeightMask, unlearn
from wagle.data import generate_rows
from wagle.unlearning import ResumeMismatchError
from wagle.unlearning.checkpoint import list_checkpoints

ROWS = generate_rows(num_authors=20)
FORGET, RETAIN = ROWS["forget10"][:6], ROWS["retain90"][:12]
KW = {"steps": 2, "lr": 1e-3, "batch_size": 2, "checkpoint_every": 1, "progress": False, "method": "npo"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step NPO run's checkpoint folder and its final weights."""
    folder = str(tmp_path_factory.mktemp("run") / "ckpt")
    model = tiny_model()
    unlearn(model, FORGET, RETAIN, tokenizer=tiny_tokenizer(), checkpoint_dir=folder, **KW)
    return folder, {n: p.detach().clone() for n, p in model.named_parameters()}


def copy_of(folder, tmp_path):
    target = str(tmp_path / "ckpt")
    shutil.copytree(folder, target)
    return target


def half_mask(model):
    return WeightMask.from_dict({n: torch.rand(p.shape) < 0.5 for n, p in model.named_parameters()})


CHANGES = {
    "lr": ({"lr": 2e-3}, "lr 0.001 -> 0.002"),
    "steps": ({"steps": 3}, "steps 2 -> 3"),
    "method": ({"method": "grad_diff"}, "method npo -> grad_diff"),
    "beta": ({"objective_kwargs": {"beta": 0.2}}, "'beta': 0.1"),
    "seed": ({"seed": 1}, "seed 0 -> 1"),
    "batch_size": ({"batch_size": 3}, "batch_size 2 -> 3"),
    "grad_accum": ({"grad_accum": 2}, "grad_accum 1 -> 2"),
    "max_length": ({"max_length": 64}, "max_length 256 -> 64"),
    "warmup": ({"warmup_ratio": 0.5}, "warmup steps 0 -> 1"),
    "weight_decay": ({"weight_decay": 0.1}, "weight_decay 0.0 -> 0.1"),
    "clipping": ({"max_grad_norm": 0.5}, "max_grad_norm 1.0 -> 0.5"),
    "state_dtype": ({"state_dtype": torch.bfloat16}, "state_dtype torch.float32 -> torch.bfloat16"),
    "step_in_backward": ({"step_in_backward": True}, "step_in_backward False -> True"),
    "precision": ({"precision": "bf16"}, "precision None -> bf16"),
    "mask": ({"mask": "half"}, "mask none -> sha256:"),
    "model": ({"model_seed": 5}, "model weights sha256:"),
    "more forget data": ({"forget": ROWS["forget10"][:8]}, "forget data 6 examples"),
    "other retain data": ({"retain": ROWS["retain90"][12:24]}, "retain data 12 examples, sha256:"),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_finished_run_rerun_with_other_settings_is_refused(finished, tmp_path, change):
    folder = copy_of(finished[0], tmp_path)
    overrides, expected = CHANGES[change]
    overrides = dict(overrides)
    model = tiny_model(seed=overrides.pop("model_seed", 0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if overrides.get("mask") == "half":
        overrides["mask"] = half_mask(model)
    forget, retain = overrides.pop("forget", FORGET), overrides.pop("retain", RETAIN)
    with pytest.raises(ResumeMismatchError) as info:
        unlearn(
            model, forget, retain, tokenizer=tiny_tokenizer(), checkpoint_dir=folder, **{**KW, **overrides}
        )
    message = str(info.value)
    assert expected in message and "resume=False" in message and len(message.splitlines()) == 1, message
    for name, param in model.named_parameters():  # refused before anything was loaded or trained
        if change != "precision":
            assert torch.equal(param, before[name]), name


def test_the_same_run_resumes_and_a_finished_one_returns_its_weights(finished, tmp_path):
    folder = copy_of(finished[0], tmp_path)
    model = tiny_model()
    result = unlearn(model, FORGET, RETAIN, tokenizer=tiny_tokenizer(), checkpoint_dir=folder, **KW)
    assert result.resumed_from == 2 and len(result.history) == 2
    for name, param in model.named_parameters():
        assert torch.equal(param, finished[1][name]), name


def test_resume_false_discards_the_old_run(finished, tmp_path):
    folder = copy_of(finished[0], tmp_path)
    model = tiny_model()
    kw = {**KW, "lr": 2e-3, "checkpoint_every": 0}
    result = unlearn(
        model, FORGET, RETAIN, tokenizer=tiny_tokenizer(), checkpoint_dir=folder, resume=False, **kw
    )
    assert result.resumed_from is None
    assert [os.path.basename(p) for p in list_checkpoints(folder)] == ["checkpoint-000002"]
    again = unlearn(tiny_model(), FORGET, RETAIN, tokenizer=tiny_tokenizer(), checkpoint_dir=folder, **kw)
    assert again.resumed_from == 2  # the new run is the one that resumes now


def sgd(params, mask, *, lr, state_layout, state_dtype, unmasked, **_):
    from wagle.optim import MaskedSGD

    return MaskedSGD(params, mask, lr=lr, momentum=0.9, state_layout=state_layout, unmasked=unmasked)


def test_an_optimizer_factory_is_used_and_part_of_the_fingerprint(tmp_path):
    model, tok = tiny_model(), tiny_tokenizer()
    mask = half_mask(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    folder = str(tmp_path / "ckpt")
    kw = {**KW, "mask": mask, "checkpoint_dir": folder}
    unlearn(model, FORGET, RETAIN, tokenizer=tok, optimizer=sgd, **kw)
    state = torch.load(os.path.join(folder, "checkpoint-000002", "optimizer.pt"), weights_only=False)
    assert state["optimizer"]["wagle"]["optimizer"] == "MaskedSGD"
    for name, param in model.named_parameters():
        assert torch.equal(param[~mask[name]], before[name][~mask[name]]), name
    with pytest.raises(ResumeMismatchError, match="optimizer sgd -> _default_optimizer"):
        unlearn(tiny_model(), FORGET, RETAIN, tokenizer=tok, **kw)
