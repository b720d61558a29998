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


def benchmarks(data):
    """pytest-benchmark JSON rows as (params, extra_info, min seconds)."""
    return [(b["params"], b["extra_info"], b["stats"]["min"]) for b in data["benchmarks"]]


def test_mask_benchmark_rows_agree_across_methods(session):
    out, _ = session
    rows = benchmarks(load(out, "mask-llama2-tiny.json"))
    assert {(p["backend"], p["ratio"]) for p, _, _ in rows} == {
        (m, r) for m in ("triton", "torch") for r in (0.1, 0.5, 0.95)
    }
    for params, info, seconds in rows:
        assert info["shapes"] == "llama2-tiny" and seconds > 0
        assert info["selected"] == int(params["ratio"] * info["numel"])
        assert info["input_passes"] >= 2 and info["GBps_min"] > 0
    reference = benchmarks(load(out, "mask-llama2-tiny-vs-reference.json"))
    assert {p["backend"] for p, _, _ in reference} == {"triton", "torch", "reference"}
    sweep = load(out, "mask-llama2-tiny-sweep.json")["results"]
    assert len(sweep) == 2 and all("config" in r for r in sweep)


def test_optimizer_and_memory_rows(session):
    out, _ = session
    rows = benchmarks(load(out, "optimizer-llama2-tiny.json"))
    cases = {(p["backend"], p["layout"], p["ratio"]) for p, _, _ in rows}
    for ratio in (0.1, 0.5, 0.95):
        for backend in ("triton", "torch"):
            assert {(backend, layout, ratio) for layout in ("dense", "compact", "auto")} <= cases
        assert ("reference", "dense", ratio) in cases
    assert all(seconds > 0 for _, _, seconds in rows)
    compact = {
        p["ratio"]: i["state_bytes"]
        for p, i, _ in rows
        if p["layout"] == "compact" and p["backend"] == "triton"
    }
    assert compact[0.1] < compact[0.5] < compact[0.95]
    auto = {
        p["ratio"]: i["state_bytes"] for p, i, _ in rows if p["layout"] == "auto" and p["backend"] == "triton"
    }
    assert all(auto[r] <= compact[r] for r in compact), (auto, compact)
    phases = [r["phase"] for r in load(out, "memory-tiny.json")["results"]]
    assert any(p.startswith("attribution r=0.5") for p in phases)
    assert any(p.startswith("npo+wagle step 1 r=0.1") for p in phases)
    assert any(p.startswith("reference step") for p in phases)
