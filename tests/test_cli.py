"""The ``wagle`` command line end to end on a tiny saved model, including the error paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import tiny_model, tiny_tokenizer

from wagle import WeightMask
from wagle.cli import main
from wagle.data import write_benchmark
from wagle.models import save_model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    paths = write_benchmark(str(root / "data"), num_authors=20)
    save_model(tiny_model(), tiny_tokenizer(), str(root / "model"))
    return root, paths


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_and_version():
    for args in (
        ["--help"],
        ["demo", "--help"],
        ["mask", "--help"],
        ["unlearn", "--help"],
        ["eval", "--help"],
    ):
        done = subprocess.run([sys.executable, "-m", "wagle.cli", *args], capture_output=True, text=True)
        assert done.returncode == 0 and "usage: wagle" in done.stdout
    done = subprocess.run([sys.executable, "-m", "wagle.cli"], capture_output=True, text=True)
    assert done.returncode == 2 and "COMMAND" in done.stderr


def test_mask_unlearn_eval_end_to_end(workspace, capsys):
    root, paths = workspace
    mask_path = root / "mask.safetensors"
    code, out, err = run_cli(
        [
            "mask",
            "--model",
            root / "model",
            "--forget",
            paths["forget10"],
            "--retain",
            paths["retain90"],
            "--ratio",
            "0.25",
            "--offload-gradients",
            "--gradient-checkpointing",
            "--plot",
            root / "densities.png",
            "--out",
            mask_path,
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    assert "total" in out and mask_path.exists()
    assert (root / "densities.png").read_bytes()[:4] == b"\x89PNG"
    mask = WeightMask.load(mask_path)
    assert abs(mask.density - 0.25) < 1e-3

    out_dir = root / "unlearned"
    code, out, err = run_cli(
        [
            "unlearn",
            "--model",
            root / "model",
            "--forget",
            paths["forget10"],
            "--retain",
            paths["retain90"],
            "--mask",
            mask_path,
            "--method",
            "npo",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--lr",
            "1e-3",
            "--checkpoint-every",
            "1",
            "--step-in-backward",
            "--state-dtype",
            "bf16",
            "--gradient-checkpointing",
            "--out",
            out_dir,
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    assert (out_dir / "model" / "config.json").exists() and (out_dir / "checkpoints" / "latest").exists()
    from wagle.models import load_model

    before, _ = load_model(root / "model")
    after, _ = load_model(out_dir / "model")
    for (name, p), q in zip(before.named_parameters(), after.parameters(), strict=True):
        assert torch.equal(p[~mask[name]], q[~mask[name]])

    report = root / "report.json"
    facts = root / "world_facts.jsonl"  # TOFU's world-facts schema: no paraphrased answer
    with open(paths["general"]) as src, open(facts, "w") as dst:
        for line in src:
            row = json.loads(line)
            row.pop("paraphrased_answer")
            dst.write(json.dumps(row) + "\n")
    code, out, err = run_cli(
        [
            "eval",
            "--model",
            out_dir / "model",
            "--forget",
            paths["forget10"],
            "--retain",
            paths["retain90"],
            "--general",
            paths["general"],
            "--world-facts",
            facts,
            "--reference-model",
            root / "model",
            "--batch-size",
            "8",
            "--max-new-tokens",
            "48",
            "--out",
            report,
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    data = json.loads(report.read_text())
    assert set(data["splits"]) == {"forget", "retain", "general", "world_facts"}
    assert data["forget_quality"] is not None and data["splits"]["world_facts"]["kind"] == "options"
    assert "world_facts/probability" in data["utility_components"]


def test_demo_quick(tmp_path, capsys):
    args = ["demo", "--quick", "--out", tmp_path / "demo", "--no-progress", "--workers", "1"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert "NPO+WAGLE" in out and "NPO+random" in out
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert set(report["results"]) == {"retain model", "target", "NPO", "NPO+WAGLE", "NPO+random"}
    assert "Utility at matched forgetting" in out and "+-" in out
    for name in ("frontier.png", "tradeoff.png", "mask_densities.png"):
        assert (tmp_path / "demo" / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args, message",
    [
        (
            [
                "mask",
                "--model",
                "{root}/nope",
                "--forget",
                "{forget}",
                "--retain",
                "{retain}",
                "--ratio",
                "0.5",
                "--out",
                "{root}/m.safetensors",
            ],
            "does not exist",
        ),
        (
            [
                "mask",
                "--model",
                "{root}/model",
                "--forget",
                "{forget}",
                "--retain",
                "{retain}",
                "--ratio",
                "1.5",
                "--out",
                "{root}/m.safetensors",
            ],
            "--ratio",
        ),
        (
            [
                "mask",
                "--model",
                "{root}/model",
                "--forget",
                "{root}/bad.jsonl",
                "--retain",
                "{retain}",
                "--ratio",
                "0.5",
                "--out",
                "{root}/m.safetensors",
            ],
            "'question' and 'answer'",
        ),
        (
            [
                "unlearn",
                "--model",
                "{root}/model",
                "--forget",
                "{forget}",
                "--retain",
                "{retain}",
                "--mask",
                "{root}/foreign.safetensors",
                "--out",
                "{root}/u",
            ],
            "another model",
        ),
        (
            [
                "unlearn",
                "--model",
                "{root}/model",
                "--forget",
                "{forget}",
                "--retain",
                "{retain}",
                "--steps",
                "0",
                "--out",
                "{root}/u",
            ],
            "steps",
        ),
        (
            [
                "eval",
                "--model",
                "{root}/model",
                "--forget",
                "{root}/missing.jsonl",
                "--retain",
                "{retain}",
                "--out",
                "{root}/r.json",
            ],
            "does not exist",
        ),
        (["demo", "--ratio", "0", "--out", "{root}/d"], "--ratio"),
    ],
)
def test_user_errors_are_one_line_with_exit_2(workspace, capsys, args, message):
    root, paths = workspace
    (root / "bad.jsonl").write_text('{"prompt": "x"}\n')
    WeightMask.from_dict({"other.weight": torch.ones(2, dtype=torch.bool)}).save(root / "foreign.safetensors")
    filled = [a.format(root=root, forget=paths["forget10"], retain=paths["retain90"]) for a in args]
    code, out, err = run_cli([*filled, "--no-progress"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wagle: error:") and message in lines[0], err
    assert "Traceback" not in err and not os.path.exists(root / "u" / "model")
