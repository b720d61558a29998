"""The GPU session script and the benchmarks it runs, on tiny shapes on the CPU (SMOKE=1), so that a
lent GPU's few minutes are never spent on a broken script. Checks the files each stage returns (at most
8 per device call) and that the numbers in them are consistent."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-session")
    env = dict(os.environ, SMOKE="1", OUT=str(out), BUDGET="900")
    done = subprocess.run(
        ["bash", "benchmarks/gpu_session.sh", "env", "mask", "optimizer", "memory"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return out, done


def load(out, name):
    with open(out / name) as handle:
        return json.load(handle)


def test_every_stage_succeeds_and_returns_few_files(session):
    out, done = session
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert files == [
        "env.txt",
        "mask-llama2-tiny-sweep.json",
        "mask-llama2-tiny-vs-reference.json",
        "mask-llama2-tiny.json",
        "mask.log",
        "memory-tiny.json",
        "memory.log",
        "optimizer-llama2-tiny.json",
        "optimizer.log",
    ]
    # the planned device calls return <= 8 files each: env+tests, mask, optimizer+memory
    assert len([f for f in files if f.startswith("mask")]) <= 8
    assert "MISSING" not in (out / "env.txt").read_text()


def test_mask_benchmark_rows_agree_across_methods(session):
    out, _ = session
    data = load(out, "mask-llama2-tiny.json")
    assert data["environment"]["device"] == "cpu" and data["copy_bandwidth_GBps"] > 0
    rows = data["results"]
    assert {(r["method"], r["ratio"]) for r in rows} == {
        (m, r) for m in ("triton", "torch") for r in (0.1, 0.5, 0.95)
    }
    numel = data["config"]["numel"]
    for row in rows:
        assert "error" not in row, row
        assert row["selected"] == int(row["ratio"] * numel)
        assert row["input_passes"] >= 2 and row["seconds"] > 0
    reference = load(out, "mask-llama2-tiny-vs-reference.json")["results"]
    assert {r["method"] for r in reference} == {"triton", "torch", "reference"}
    sweep = load(out, "mask-llama2-tiny-sweep.json")["results"]
    assert len(sweep) == 2 and all("config" in r for r in sweep)


def test_optimizer_and_memory_rows(session):
    out, _ = session
    rows = load(out, "optimizer-llama2-tiny.json")["results"]
    methods = {(r["method"], r["ratio"]) for r in rows}
    for ratio in (0.1, 0.5, 0.95):
        assert {("masked-dense", ratio), ("masked-compact", ratio), ("torch-foreach+mul", ratio)} <= methods
    for row in rows:
        assert "error" not in row and row["seconds"] > 0
    compact = {r["ratio"]: r["state_bytes"] for r in rows if r["method"] == "masked-compact"}
    assert compact[0.1] < compact[0.5] < compact[0.95]
    phases = [r["phase"] for r in load(out, "memory-tiny.json")["results"]]
    assert any(p.startswith("attribution r=0.5") for p in phases)
    assert any(p.startswith("npo+wagle step 1 r=0.1") for p in phases)
    assert any(p.startswith("reference step") for p in phases)
