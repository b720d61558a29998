"""Fault injection: ``wagle unlearn`` killed with SIGKILL at each point of a run (mid-step, mid-
checkpoint, mid-final-save), then rerun, gives the uninterrupted run's model bit for bit; a rerun with
other settings is refused; a NaN gradient stops the run without writing a model; an unwritable --out
is refused before any work."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading

import pytest
import torch
from fault_driver import install
from helpers import tiny_gpt2, tiny_model, tiny_tokenizer
from safetensors.torch import load_file

from wagle.cli import main
from wagle.data import write_benchmark
from wagle.models import save_model

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="runs wagle in forked children (Linux)")
DRIVER = os.path.join(os.path.dirname(__file__), "fault_driver.py")
RUN = ["--steps", "4", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3", "--checkpoint-every", "1"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    paths = write_benchmark(str(root / "data"), num_authors=20)
    save_model(tiny_model(), tiny_tokenizer(), str(root / "llama"))
    save_model(tiny_gpt2(dropout=0.1), tiny_tokenizer(), str(root / "gpt2"))
    return root, paths


def unlearn_args(root, paths, model, out, *extra):
    return ["unlearn", "--model", str(root / model), "--forget", paths["forget10"], "--retain",
            paths["retain90"], *RUN, *extra, "--out", str(out), "--no-progress"]  # fmt: skip


def forked(args, point=None, n=0, kill_after=None) -> int:
    """Run ``wagle`` in a forked child (modules already imported: no start-up cost) on one thread, with
    the kill hook ``point`` armed or a SIGKILL after ``kill_after`` seconds; returns its exit status
    (``-SIGKILL`` when killed). Every run of a comparison goes through here, so all use one thread."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 1
        try:
            torch.set_num_threads(1)
            if point is not None:
                install(point, n)
            if kill_after is not None:
                threading.Timer(kill_after, os.kill, (os.getpid(), signal.SIGKILL)).start()
            sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (the child exits below)
            code = main(args)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


@pytest.fixture(scope="module")
def reference(workspace):
    """The uninterrupted run's final weights, per model."""
    root, paths = workspace
    done = {}
    for model in ("llama", "gpt2"):
        assert forked(unlearn_args(root, paths, model, root / f"reference-{model}")) == 0
        done[model] = load_file(str(root / f"reference-{model}" / "model" / "model.safetensors"))
    return done


def env():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}  # fmt: skip


def killed_subprocess(args, point, n):
    done = subprocess.run([sys.executable, DRIVER, point, str(n), *args], env=env(), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == -signal.SIGKILL, (point, done.returncode, done.stderr[-2000:])


def assert_finished_like(out, expected):
    tensors = load_file(str(out / "model" / "model.safetensors"))
    assert tensors.keys() == expected.keys()
    for name in expected:
        assert torch.equal(tensors[name], expected[name]), name
    for folder in (out, out / "checkpoints"):
        assert not [n for n in os.listdir(folder) if n.startswith((".tmp", ".old"))], os.listdir(folder)


KILLS = [
    ("llama", "loss", 6),
    ("llama", "optimizer-step", 2),
    ("llama", "checkpoint-write", 2),
    ("llama", "checkpoint-publish", 3),
    ("llama", "latest", 2),
    ("llama", "prune", 1),
    ("llama", "model-write", 1),
    ("gpt2", "loss", 6),
    ("gpt2", "optimizer-step", 3),
    ("gpt2", "checkpoint-write", 3),
    ("gpt2", "checkpoint-publish", 2),
    ("gpt2", "model-write", 1),
]


@pytest.mark.parametrize("model, point, n", KILLS)
def test_kill_and_rerun_equals_the_uninterrupted_run(workspace, reference, tmp_path, model, point, n):
    root, paths = workspace
    out = tmp_path / "out"
    args = unlearn_args(root, paths, model, out)
    assert forked(args, point, n) == -signal.SIGKILL
    assert not (out / "model").exists()
    assert forked(args) == 0
    assert_finished_like(out, reference[model])


def test_kill_while_replacing_a_saved_model_keeps_one_and_the_rerun_finishes(workspace, reference, tmp_path):
    root, paths = workspace
    out = tmp_path / "out"
    args = unlearn_args(root, paths, "llama", out)
    assert forked(args) == 0
    assert forked(args, "model-swap", 1) == -signal.SIGKILL  # the rerun saves the model again
    assert not (out / "model").exists() and [n for n in os.listdir(out) if n.startswith(".old-model-")]
    assert forked(args) == 0
    assert_finished_like(out, reference["llama"])


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_kill_at_random_times_then_rerun_equals_the_uninterrupted_run(workspace, reference, tmp_path, model):
    root, paths = workspace
    out = tmp_path / "out"
    args = unlearn_args(root, paths, model, out)
    rng = random.Random(model)
    for _ in range(5):
        if forked(args, kill_after=rng.uniform(0.05, 1.5)) == 0:
            break
    assert forked(args) == 0
    assert_finished_like(out, reference[model])


@pytest.mark.slow
@pytest.mark.parametrize("model, point, n", [("llama", "loss", 6), ("gpt2", "checkpoint-write", 3)])
def test_kill_9_of_the_wagle_process_then_rerun(workspace, reference, tmp_path, model, point, n):
    """The same as above with a real ``python -m wagle.cli``-style process (tests/fault_driver.py)."""
    root, paths = workspace
    out = tmp_path / "out"
    args = unlearn_args(root, paths, model, out)
    killed_subprocess(args, point, n)
    assert forked(args) == 0
    assert_finished_like(out, reference[model])


# ---- refusals and stops in the command line --------------------------------------------------------------
def test_a_rerun_with_other_settings_is_refused_and_keeps_the_old_model(workspace, tmp_path, capsys):
    root, paths = workspace
    out = tmp_path / "out"
    assert main(unlearn_args(root, paths, "llama", out)) == 0
    capsys.readouterr()
    saved = (out / "model" / "model.safetensors").read_bytes()
    code = main([*unlearn_args(root, paths, "llama", out), "--lr", "2e-3", "--method", "grad_diff"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "--lr 0.001 -> 0.002" in lines[0] and "--method npo -> grad_diff" in lines[0]
    assert "--no-resume" in lines[0] and "Traceback" not in err
    assert (out / "model" / "model.safetensors").read_bytes() == saved
    code = main(unlearn_args(root, paths, "llama", out))  # the same settings: resumes (finished)
    assert code == 0 and "resumed from step 4 of 4" in capsys.readouterr().out
    code = main([*unlearn_args(root, paths, "llama", out), "--lr", "2e-3", "--no-resume"])
    assert code == 0 and "resumed" not in capsys.readouterr().out


def test_a_nan_gradient_stops_the_command_without_writing_a_model(workspace, tmp_path, capsys, monkeypatch):
    from wagle.objectives.npo import NPO

    root, paths = workspace
    real_loss = NPO.loss
    calls = {"n": 0}

    class NaNGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            return grad * float("nan")

    def loss(self, model, forget, retain):
        calls["n"] += 1
        value, stats = real_loss(self, model, forget, retain)
        return (NaNGrad.apply(value) if calls["n"] >= 5 else value), stats

    monkeypatch.setattr(NPO, "loss", loss)
    out = tmp_path / "out"
    code = main(unlearn_args(root, paths, "llama", out))
    err = capsys.readouterr().err
    assert code == 1 and "gradient norm became nan" in err and "checkpoint-000002" in err, err
    assert not (out / "model").exists()


def test_an_out_under_a_file_is_refused_before_any_work(workspace, tmp_path, capsys, monkeypatch):
    import wagle.unlearning

    root, paths = workspace
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(wagle.unlearning, "unlearn", lambda *a, **k: pytest.fail("the run started"))
    code = main(unlearn_args(root, paths, "llama", tmp_path / "file" / "out"))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("wagle: error: --out:") and "is a file" in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_refused_before_any_work(workspace, tmp_path, capsys, monkeypatch):
    import wagle.unlearning

    root, paths = workspace
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    monkeypatch.setattr(wagle.unlearning, "unlearn", lambda *a, **k: pytest.fail("the run started"))
    code = main(unlearn_args(root, paths, "llama", locked / "out"))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("wagle: error: --out: cannot write") and len(err.splitlines()) == 1


def test_a_failed_write_is_a_one_line_error_naming_out(workspace, tmp_path, capsys, monkeypatch):
    import wagle.models

    root, paths = workspace

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "model"))

    monkeypatch.setattr(wagle.models, "save_model", full)
    code = main(unlearn_args(root, paths, "llama", tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("wagle: error: --out: could not write") and "No space left" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_stale_temporaries_in_out_are_removed_before_the_run(workspace, tmp_path, capsys, monkeypatch):
    import wagle.unlearning
    from wagle.files import owner_tag

    root, paths = workspace
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = owner_tag().replace(f"-{os.getpid()}-", f"-{child.pid}-")
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    stale = [out / f".tmp-model-{dead}ab12", out / "checkpoints" / f".tmp-checkpoint-{dead}cd34"]
    for folder in stale:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"a crashed copy")
    seen = []

    def stand_in(*args, **kwargs):  # records what the run would find, then stops it
        seen.extend(p.exists() for p in stale)
        raise KeyboardInterrupt

    monkeypatch.setattr(wagle.unlearning, "unlearn", stand_in)
    assert main(unlearn_args(root, paths, "llama", out)) == 130
    assert seen == [False, False]
