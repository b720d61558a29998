"""Runs that cannot silently go wrong: NaN/Inf gradients stop the run, dropout runs are reproducible
and resumable, damaged checkpoints are refused or skipped, stale temporary files are cleaned up, and
checkpoint files are flushed before they are published."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import tiny_gpt2, tiny_model, tiny_moe, tiny_tokenizer

from wagle import UnlearningDiverged, WeightMask, unlearn
from wagle.data import generate_rows
from wagle.files import owner_tag, remove_stale_temporaries
from wagle.objectives import GradDiff, make_objective
from wagle.optim import MaskedAdamW
from wagle.unlearning import CheckpointError
from wagle.unlearning.checkpoint import FILES, MANIFEST, list_checkpoints, save_checkpoint

ROWS = generate_rows(num_authors=20)
FORGET, RETAIN = ROWS["forget10"][:6], ROWS["retain90"][:12]
KW = {"steps": 4, "lr": 1e-3, "batch_size": 2, "progress": False}
MODELS = {"llama": tiny_model, "gpt2": tiny_gpt2, "moe": tiny_moe}


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


class _PoisonGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``value`` (NaN or Inf)."""

    @staticmethod
    def forward(ctx, x, value):
        ctx.value = value
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.value, None


class PoisonedGradDiff(GradDiff):
    """GradDiff whose loss stays finite while its gradient becomes ``value`` from loss call ``at`` on."""

    def __init__(self, at: int, value: float = float("nan")):
        super().__init__()
        self.at, self.value, self._calls = at, value, 0

    def loss(self, model, forget, retain):
        self._calls += 1
        loss, stats = super().loss(model, forget, retain)
        if self._calls >= self.at:
            loss = _PoisonGradient.apply(loss, self.value)
        return loss, stats


# ---- NaN/Inf gradients with a finite loss -----------------------------------------------------------
@pytest.mark.parametrize(
    "variant, model_name",
    [
        ("clipped", "llama"),
        ("unclipped", "llama"),
        ("inf", "llama"),
        ("step_in_backward", "llama"),
        ("masked step_in_backward", "llama"),
        ("clipped", "gpt2"),
        ("step_in_backward", "moe"),
    ],
)
def test_a_nan_gradient_stops_the_run_at_the_last_good_checkpoint(tmp_path, variant, model_name):
    model, tok = MODELS[model_name](), tiny_tokenizer()
    folder = str(tmp_path / "ckpt")
    kw = {**KW, "checkpoint_dir": folder, "checkpoint_every": 1}
    value = float("inf") if variant == "inf" else float("nan")
    if variant == "unclipped":
        kw["max_grad_norm"] = 0.0
    if "step_in_backward" in variant:
        kw["step_in_backward"] = True
    if variant.startswith("masked"):
        kw["mask"] = WeightMask.from_dict({n: torch.rand(p.shape) < 0.3 for n, p in model.named_parameters()})
    with pytest.raises(UnlearningDiverged, match="checkpoint-000002") as info:
        unlearn(model, FORGET, RETAIN, tokenizer=tok, method=PoisonedGradDiff(at=3, value=value), **kw)
    assert "NaN/Inf" in str(info.value) or "nan" in str(info.value) or "inf" in str(info.value)
    assert info.value.checkpoint.endswith("checkpoint-000002")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [os.path.basename(p) for p in list_checkpoints(folder)] == [
        "checkpoint-000002",
        "checkpoint-000001",
    ]
    if "step_in_backward" not in variant:  # nothing of step 3 was applied
        from safetensors.torch import load_file

        saved = load_file(os.path.join(folder, "checkpoint-000002", "model.safetensors"))
        assert_same(weights(model), saved)


class _NaNAfter(MaskedAdamW):
    """MaskedAdamW that writes a NaN into its first parameter on step ``at`` (finite loss and grads)."""

    at = 3

    def step(self, closure=None):
        result = super().step(closure)
        self._steps = getattr(self, "_steps", 0) + 1
        if self._steps == self.at:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    folder = str(tmp_path / "ckpt")
    with pytest.raises(UnlearningDiverged, match="checkpoint-000002"):
        unlearn(
            tiny_model(),
            FORGET,
            RETAIN,
            tokenizer=tiny_tokenizer(),
            method="grad_diff",
            optimizer=_NaNAfter,
            checkpoint_dir=folder,
            checkpoint_every=1,
            **KW,
        )
    assert os.path.basename(list_checkpoints(folder)[0]) == "checkpoint-000002"
    model = tiny_model()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("inf")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="NaN/Inf weights"):
        save_checkpoint(str(tmp_path / "other"), 1, model, optimizer, None, {}, {})


# ---- dropout: reproducible, resumable, and the caller's RNG left alone ----------------------------
@pytest.mark.parametrize("model_name", ["gpt2", "llama", "moe"])
def test_runs_are_bit_identical_and_keep_the_callers_rng_state(model_name):
    tok = tiny_tokenizer()
    first, second, other_seed = MODELS[model_name](), MODELS[model_name](), MODELS[model_name]()
    state = torch.get_rng_state()
    unlearn(first, FORGET, RETAIN, tokenizer=tok, method="npo", **KW)
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(7)  # whatever the caller does with the global generator in between
    unlearn(second, FORGET, RETAIN, tokenizer=tok, method="npo", **KW)
    assert_same(weights(first), weights(second))
    if model_name == "gpt2":  # dropout is on, and seeded from the run's seed
        unlearn(other_seed, FORGET, RETAIN, tokenizer=tok, method="npo", seed=1, **KW)
        plain = tiny_gpt2(dropout=0.0)
        unlearn(plain, FORGET, RETAIN, tokenizer=tok, method="npo", seed=0, **KW)
        assert any(not torch.equal(a, b) for a, b in zip(first.parameters(), plain.parameters(), strict=True))


class _Interrupt(GradDiff):
    """Raises KeyboardInterrupt on loss call ``after`` (a kill between checkpoints)."""

    def __init__(self, after: int):
        super().__init__()
        self._after, self._calls = after, 0

    def loss(self, model, forget, retain):
        self._calls += 1
        if self._calls == self._after:
            raise KeyboardInterrupt
        return super().loss(model, forget, retain)


@pytest.mark.parametrize("model_name", ["gpt2", "llama", "moe"])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, model_name):
    tok, folder = tiny_tokenizer(), str(tmp_path / "ckpt")
    kw = {**KW, "steps": 5, "grad_accum": 2, "checkpoint_every": 2}
    straight = MODELS[model_name]()
    unlearn(straight, FORGET, RETAIN, tokenizer=tok, method="grad_diff", **kw)
    with pytest.raises(KeyboardInterrupt):
        unlearn(MODELS[model_name](), FORGET, RETAIN, tokenizer=tok, method=_Interrupt(after=7),
                checkpoint_dir=folder, **kw)  # fmt: skip
    resumed = MODELS[model_name]()
    result = unlearn(resumed, FORGET, RETAIN, tokenizer=tok, method="grad_diff", checkpoint_dir=folder, **kw)
    assert result.resumed_from == 2
    assert_same(weights(straight), weights(resumed))


# ---- damaged checkpoints ------------------------------------------------------------------------------
def damage(path: str, how: str) -> None:
    with open(path, "rb") as handle:
        data = bytearray(handle.read())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    with open(path, "wb") as handle:
        handle.write(bytes(data))


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4, and its final weights."""
    folder = str(tmp_path_factory.mktemp("damage") / "ckpt")
    model = tiny_model()
    unlearn(model, FORGET, RETAIN, tokenizer=tiny_tokenizer(), method="npo", checkpoint_dir=folder,
            checkpoint_every=2, **KW)  # fmt: skip
    return folder, weights(model)


@pytest.mark.parametrize("how", ["truncated", "flipped"])
@pytest.mark.parametrize("name", [*FILES, MANIFEST])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(two_checkpoints, tmp_path, name, how):
    folder = str(tmp_path / "ckpt")
    shutil.copytree(two_checkpoints[0], folder)
    damage(os.path.join(folder, "checkpoint-000004", name), how)
    model = tiny_model()
    result = unlearn(model, FORGET, RETAIN, tokenizer=tiny_tokenizer(), method="npo", checkpoint_dir=folder,
                     checkpoint_every=2, **KW)  # fmt: skip
    assert result.resumed_from == 2
    assert len(result.damaged_checkpoints) == 1 and name in result.damaged_checkpoints[0]
    assert "checkpoint-000004" in result.damaged_checkpoints[0]
    assert_same(weights(model), two_checkpoints[1])  # steps 3-4 recomputed: the same weights


@pytest.mark.parametrize("how", ["truncated", "flipped", "missing"])
@pytest.mark.parametrize("name", [*FILES, MANIFEST])
def test_a_damaged_only_checkpoint_is_a_clear_error(two_checkpoints, tmp_path, name, how):
    folder = str(tmp_path / "ckpt")
    shutil.copytree(two_checkpoints[0], folder)
    shutil.rmtree(os.path.join(folder, "checkpoint-000002"))
    path = os.path.join(folder, "checkpoint-000004", name)
    os.unlink(path) if how == "missing" else damage(path, how)
    model = tiny_model()
    before = weights(model)
    with pytest.raises(CheckpointError) as info:
        unlearn(model, FORGET, RETAIN, tokenizer=tiny_tokenizer(), method="npo", checkpoint_dir=folder,
                checkpoint_every=2, **KW)  # fmt: skip
    message = str(info.value)
    assert "checkpoint-000004" in message and name in message and len(message.splitlines()) == 1, message
    assert_same(weights(model), before)  # nothing was loaded


def test_checkpoint_files_are_flushed_before_the_rename_that_publishes_them(tmp_path, monkeypatch):
    import wagle.files as files

    events = []
    real_fsync, real_replace = files._fsync, os.replace
    monkeypatch.setattr(files, "_fsync", lambda path: (events.append(("fsync", path)), real_fsync(path)))
    monkeypatch.setattr(files.os, "replace", lambda a, b: (events.append(("rename", a)), real_replace(a, b)))
    model = tiny_model()
    final = save_checkpoint(
        str(tmp_path), 1, model, torch.optim.SGD(model.parameters(), lr=0.1), None, {}, {}
    )
    rename = next(i for i, (kind, src) in enumerate(events) if kind == "rename" and "checkpoint" in src)
    tmp = events[rename][1]
    flushed = {os.path.basename(p) for kind, p in events[:rename] if kind == "fsync" and p.startswith(tmp)}
    assert flushed == set(os.listdir(final)) == {*FILES, MANIFEST}


# ---- stale temporary files ------------------------------------------------------------------------------
def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    live, dead = owner_tag(), owner_tag().replace(f"-{os.getpid()}-", f"-{dead_pid()}-")
    (tmp_path / "model").mkdir()
    made = {
        f".tmp-model-{dead}abc123": "dir",  # a crashed save_model: a full model copy
        f".tmp-checkpoint-{dead}x_9": "dir",
        f".tmp-report.json-{dead}q1w2e3": "file",
        f".old-model-{dead}zz": "dir",  # previous version moved aside; 'model' exists: remove
        f".old-gone-{dead}zz": "dir",  # ... 'gone' is missing: put back
        f".tmp-model-{live}alive1": "dir",  # this process: kept
        ".tmp-model-abc123": "dir",  # not a wagle name with an owner: kept
        f".tmp-other-{dead.replace(dead.split('-')[2], 'otherhost')}k": "dir",  # another machine: kept
    }
    for name, kind in made.items():
        (tmp_path / name).mkdir() if kind == "dir" else (tmp_path / name).write_text("x")
    removed = remove_stale_temporaries(tmp_path)
    assert len(removed) == 5
    left = sorted(os.listdir(tmp_path))
    assert left == sorted(["model", "gone", f".tmp-model-{live}alive1", ".tmp-model-abc123",
                           f".tmp-other-{dead.replace(dead.split('-')[2], 'otherhost')}k"])  # fmt: skip


def test_an_unlearning_run_cleans_its_checkpoint_folder(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    stale = folder / f".tmp-checkpoint-{owner_tag().replace(f'-{os.getpid()}-', f'-{dead_pid()}-')}a1"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    unlearn(tiny_model(), FORGET, RETAIN, tokenizer=tiny_tokenizer(), method="grad_diff",
            checkpoint_dir=str(folder), **{**KW, "steps": 1})  # fmt: skip
    assert not stale.exists()
    assert not [n for n in os.listdir(folder) if n.startswith((".tmp", ".old"))]


def test_objective_settings_are_its_hyperparameters():
    assert make_objective("npo", beta=0.2).settings() == {"beta": 0.2, "retain_weight": 1.0}
    assert make_objective("rmu").settings() == {"alpha": 100.0, "seed": 0, "steering_coef": 6.5}


def test_step_in_backward_refuses_to_step_a_parameter_with_a_nan_gradient():
    from wagle.optim import NonFiniteGradientError, StepInBackward

    first, second = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    optimizer = MaskedAdamW([("first", first), ("second", second)], WeightMask({}), lr=0.1, unmasked="dense")
    hooks = StepInBackward(optimizer)
    with pytest.raises(NonFiniteGradientError, match="'first'"):
        # backward reaches `second` first (it is used last), then `first` with a NaN gradient
        (_PoisonGradient.apply(first, float("nan")).sum() + (first.detach() * second).sum()).backward()
    hooks.remove()
    assert torch.equal(first.detach(), torch.ones(3)) and first.grad is None
    assert not torch.equal(second.detach(), torch.ones(3))  # stepped before the NaN was reached
