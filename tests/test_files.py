"""Atomic writes (wagle.files) and the permissions of everything wagle writes: a plain open()/mkdir()
would give 0666/0777 minus the umask; tempfile's 0600/0700 would hide masks, reports, checkpoints and
saved models from the rest of a group on a shared cluster."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from helpers import tiny_model, tiny_tokenizer

from wagle import WeightMask
from wagle.evaluation import write_json
from wagle.files import atomic_write, atomic_write_text, replace_folder, temporary_folder
from wagle.models import save_model
from wagle.unlearning.checkpoint import save_checkpoint


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_text_has_usual_mode_and_replaces(tmp_path, umask_027):
    path = tmp_path / "sub" / "a.txt"
    atomic_write_text(path, "one\n")
    atomic_write_text(path, "two\n")
    assert path.read_text() == "two\n"
    assert mode(path) == 0o640
    assert os.listdir(path.parent) == ["a.txt"]


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.bin"
    atomic_write_text(path, "kept")

    def failing(tmp):
        with open(tmp, "w") as handle:
            handle.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, failing)
    assert path.read_text() == "kept"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_replace_folder_swaps_complete_folders(tmp_path, umask_027):
    final = str(tmp_path / "out")
    for content in ("first", "second"):
        tmp = temporary_folder(tmp_path, ".tmp-")
        assert mode(tmp) == 0o750
        with open(os.path.join(tmp, "f"), "w") as handle:
            handle.write(content)
        replace_folder(tmp, final)
    with open(os.path.join(final, "f")) as handle:
        assert handle.read() == "second"
    assert os.listdir(tmp_path) == ["out"]


def test_everything_wagle_writes_has_the_usual_permissions(tmp_path, umask_027):
    model, tok = tiny_model(), tiny_tokenizer()
    mask = WeightMask.from_dict({n: torch.rand(p.shape) < 0.5 for n, p in model.named_parameters()})
    mask.save(tmp_path / "mask.safetensors")
    write_json(tmp_path / "report.json", {"a": 1})
    save_model(model, tok, tmp_path / "model")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = save_checkpoint(str(tmp_path / "ckpt"), 3, model, optimizer, None, {}, {})
    for path in ("mask.safetensors", "report.json", "ckpt/latest"):
        assert mode(tmp_path / path) == 0o640, path
    for folder in (tmp_path / "model", ckpt):
        assert mode(folder) == 0o750, folder
        for name in os.listdir(folder):
            assert mode(os.path.join(folder, name)) == 0o640, (folder, name)
