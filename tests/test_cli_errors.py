"""CLI error handling: user errors (UserError, OSError on the user's paths) are one line + exit 2,
bugs keep their traceback (exit 1), -v shows tracebacks; bad output paths, masks that are folders or
damaged, and non-finite float options are refused before any work."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import tiny_model, tiny_tokenizer

from wagle import WeightMask, commands
from wagle.cli import main
from wagle.data import write_benchmark
from wagle.errors import UserError
from wagle.files import atomic_write_text, check_writable
from wagle.models import save_model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors")
    paths = write_benchmark(str(root / "data"), num_authors=20)
    save_model(tiny_model(), tiny_tokenizer(), str(root / "model"))
    (root / "a_file").write_text("x")
    return root, paths


def run(args, capsys):
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wagle: error: ") and "Traceback" not in err, err
    return lines[0]


def mask_args(root, paths, *extra):
    return [
        "mask",
        "--model",
        root / "model",
        "--forget",
        paths["forget10"],
        "--retain",
        paths["retain90"],
        "--ratio",
        "0.5",
        "--no-progress",
        *extra,
    ]


def test_a_bug_keeps_its_traceback_and_exit_1(workspace, capsys, monkeypatch):
    root, paths = workspace

    def broken(args):
        raise TypeError("unsupported operand")  # a bug, not the user's mistake

    monkeypatch.setattr(commands, "run_mask", broken)
    code, err = run(mask_args(root, paths, "--out", root / "m.safetensors"), capsys)
    assert code == 1 and "Traceback" in err and "TypeError: unsupported operand" in err
    assert "wagle: error" not in err


def test_user_errors_are_one_line_and_verbose_adds_the_traceback(workspace, capsys, monkeypatch):
    root, paths = workspace

    def refused(args):
        raise UserError("--ratio: bad")

    monkeypatch.setattr(commands, "run_mask", refused)
    code, err = run(mask_args(root, paths, "--out", root / "m.safetensors"), capsys)
    assert code == 2 and one_line(err) == "wagle: error: --ratio: bad"
    code, err = run(mask_args(root, paths, "--out", root / "m.safetensors", "-v"), capsys)
    assert code == 2 and "Traceback" in err and err.strip().endswith("wagle: error: --ratio: bad")


@pytest.mark.parametrize(
    "out, words",
    [("a_file/mask.safetensors", "a_file is a file, not a folder"), ("", "is a directory")],
)
def test_mask_out_that_cannot_be_written_is_refused_before_any_work(
    workspace, capsys, monkeypatch, out, words
):
    root, paths = workspace
    monkeypatch.setattr("wagle.models.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    code, err = run(mask_args(root, paths, "--out", root / out), capsys)
    assert code == 2 and "--out" in one_line(err) and words in err


def test_eval_out_and_plot_are_checked_first(workspace, capsys, monkeypatch):
    root, paths = workspace
    monkeypatch.setattr("wagle.models.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    code, err = run(
        [
            "eval",
            "--model",
            root / "model",
            "--forget",
            paths["forget10"],
            "--retain",
            paths["retain90"],
            "--out",
            root / "a_file" / "r.json",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 2 and "--out: cannot create" in one_line(err)
    code, err = run(mask_args(root, paths, "--out", root / "m.safetensors", "--plot", root), capsys)
    assert code == 2 and "--plot" in one_line(err) and "is a directory" in err


def test_a_directory_or_a_damaged_file_as_mask(workspace, capsys):
    root, paths = workspace
    base = [
        "unlearn",
        "--model",
        root / "model",
        "--forget",
        paths["forget10"],
        "--retain",
        paths["retain90"],
        "--steps",
        "1",
        "--out",
        root / "u",
        "--no-progress",
        "--mask",
    ]
    code, err = run([*base, root], capsys)
    assert code == 2 and f"{root}: is a directory, not a mask file" in one_line(err)
    damaged = root / "damaged.safetensors"
    WeightMask.from_dict(
        {n: torch.ones(p.shape, dtype=torch.bool) for n, p in tiny_model().named_parameters()}
    ).save(damaged)
    raw = bytearray(damaged.read_bytes())
    raw[-1] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    code, err = run([*base, damaged], capsys)
    assert code == 2 and f"{damaged}: damaged mask file" in one_line(err)
    assert not (root / "u" / "model").exists()


@pytest.mark.parametrize(
    "option, value",
    [
        ("--beta", "nan"),
        ("--lr", "inf"),
        ("--weight-decay", "-inf"),
        ("--max-grad-norm", "nan"),
        ("--warmup-ratio", "nan"),
    ],
)
def test_non_finite_float_options_are_refused(workspace, capsys, option, value):
    root, paths = workspace
    with pytest.raises(SystemExit) as stop:
        main(
            [
                "unlearn",
                "--model",
                str(root / "model"),
                "--forget",
                paths["forget10"],
                "--out",
                str(root / "u"),
                f"{option}={value}",
            ]
        )
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"argument {option}: must be a finite number, got '{value}'" in err


def test_non_finite_scores_hint_an_option_the_cli_has(workspace, capsys, tmp_path):
    root, paths = workspace
    model = tiny_model()
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    save_model(model, tiny_tokenizer(), str(tmp_path / "nan-model"))
    args = [
        "mask",
        "--model",
        tmp_path / "nan-model",
        "--forget",
        paths["forget10"],
        "--method",
        "magnitude",
        "--ratio",
        "0.5",
        "--out",
        tmp_path / "m.safetensors",
        "--no-progress",
    ]
    code, err = run(args, capsys)
    assert code == 2 and "--nonfinite lowest" in one_line(err)
    code, err = run([*args, "--nonfinite", "lowest"], capsys)
    assert code == 0, err
    assert not WeightMask.load(tmp_path / "m.safetensors")["model.norm.weight"][0]


def test_check_writable_and_atomic_write_name_the_target(tmp_path, monkeypatch):
    target = tmp_path / "out" / "mask.safetensors"
    check_writable(target, "--out")  # a folder that does not exist yet is fine
    assert not (tmp_path / "out").exists()

    def refuse(source, *args, **kwargs):  # as a failed rename reports it: naming the temporary file
        raise PermissionError(13, "Permission denied", source)

    monkeypatch.setattr("os.replace", refuse)
    with pytest.raises(PermissionError) as error:
        atomic_write_text(target, "x")
    assert error.value.filename == str(target) and ".tmp" not in str(error.value)
    assert os.listdir(tmp_path / "out") == []  # the temporary file is gone

    def no_files(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkstemp", no_files)
    with pytest.raises(UserError, match=r"--out: cannot write .*mask.safetensors: Permission denied"):
        check_writable(target, "--out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(UserError, match="--out: cannot write"):
            check_writable(folder / "m.safetensors", "--out")
    finally:
        folder.chmod(0o700)
