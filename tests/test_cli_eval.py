"""``wagle eval`` / ``mask`` / ``unlearn`` options of prompt format, generation length, privacy and
multiple-choice evaluation."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_model, tiny_tokenizer

from wagle import WeightMask
from wagle.cli import build_parser, main
from wagle.data import hazard_multiple_choice, write_benchmark
from wagle.models import save_model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_eval")
    paths = write_benchmark(str(root / "data"), num_authors=20, holdout=True)
    save_model(tiny_model(), tiny_tokenizer(), str(root / "model"))
    save_model(tiny_model(seed=1), tiny_tokenizer(), str(root / "retain"))
    mc = root / "hazard.jsonl"
    mc.write_text("".join(json.dumps(r) + "\n" for r in hazard_multiple_choice()[:8]))
    return root, paths, mc


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_defaults():
    parser = build_parser()
    args = parser.parse_args(["eval", "--model", "m", "--forget", "f", "--retain", "r", "--out", "o"])
    assert args.max_new_tokens == 200 and args.max_length == 256 and args.template == "wagle"
    for command in ("mask", "unlearn"):
        extra = ["--ratio", "0.5"] if command == "mask" else []
        args = parser.parse_args([command, "--model", "m", "--forget", "f", "--out", "o", *extra])
        assert args.template == "wagle" and args.system_prompt is None


def test_eval_with_holdout_template_and_multiple_choice(workspace, capsys):
    root, paths, mc = workspace
    report, plot = root / "report.json", root / "privacy.png"
    common = ["--model", root / "model", "--forget", paths["forget10"], "--retain", paths["retain90"]]
    code, out, err = run_cli(
        [
            "eval",
            *common,
            "--holdout",
            paths["holdout10"],
            "--reference-model",
            root / "retain",
            "--template",
            "reference",
            "--max-new-tokens",
            "3",
            "--max-length",
            "128",
            "--multiple-choice",
            mc,
            "--plot",
            plot,
            "--out",
            report,
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["settings"] == {"prompt_format": "reference", "max_new_tokens": 3, "max_length": 128}
    privacy = data["privacy"]
    assert set(privacy["auc"]) == {"loss", "zlib", "min_k", "min_k++", "reference"}
    assert privacy["privleak"] is not None and len(privacy["holdout_scores"]["loss"]) == 10
    assert "AUC min-k++" in out and "privleak" in out and "multiple choice" in out
    assert data["multiple_choice"][str(mc)]["num_examples"] == 8
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert all(len(a.split()) <= 3 for a in data["splits"]["forget"]["answers"])  # 3 new tokens at most

    code, out, err = run_cli(
        ["eval", "--model", root / "model", "--multiple-choice", mc, "--out", report], capsys
    )
    assert code == 0, err
    data = json.loads(report.read_text())
    assert "splits" not in data and 0.0 <= data["multiple_choice"][str(mc)]["accuracy"] <= 1.0


def test_mask_records_the_template(workspace, capsys):
    root, paths, _ = workspace
    out = root / "mask.safetensors"
    code, _, err = run_cli(
        [
            "mask",
            "--model",
            root / "model",
            "--forget",
            paths["forget10"],
            "--method",
            "gradient",
            "--ratio",
            "0.2",
            "--template",
            "openunlearning",
            "--out",
            out,
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    assert WeightMask.load(out).metadata["prompt_format"] == "openunlearning"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--template", "chat"], "chat template"),
        (["--system-prompt", "Be brief"], "--system-prompt"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--plot", "{root}/p.png"], "--plot"),
        (["--mia-k", "0"], "--mia-k"),
    ],
)
def test_eval_option_errors(workspace, capsys, args, message):
    root, paths, _ = workspace
    filled = [a.format(root=root) for a in args]
    base = ["eval", "--model", root / "model", "--forget", paths["forget10"], "--retain", paths["retain90"]]
    code, _, err = run_cli(
        [*base, "--max-new-tokens", "1", *filled, "--out", root / "x.json", "--no-progress"], capsys
    )
    assert (
        code == 2
        and err.startswith("wagle: error:")
        and message in err
        and len(err.strip().splitlines()) == 1
    )
    code, _, err = run_cli(
        ["eval", "--model", root / "model", "--forget", paths["forget10"], "--out", "x"], capsys
    )
    assert code == 2 and "--retain" in err
