"""Benchmark results are traceable: version and commit recorded, one timing convention, no overwrites."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import common  # noqa: E402


def test_environment_records_version_and_commit():
    info = common.environment()
    import wagle

    assert info["wagle"] == wagle.__version__
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert info["git_commit"] == head.stdout.strip() and isinstance(info["git_dirty"], bool)


def test_results_paths_never_collide(tmp_path):
    info = {"date": "2026-12-01T21:35:42+00:00", "device": "NVIDIA H200"}
    first = common.results_path("mask-x", info, folder=str(tmp_path))
    assert os.path.basename(first) == "mask-x-nvidia-h200-20261201T213542Z.json"
    open(first, "w").close()
    second = common.results_path("mask-x", info, folder=str(tmp_path))
    assert second != first and second.endswith("Z-2.json")


def test_time_stats_reports_min_and_median():
    assert common.time_stats([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "all": [1.0, 2.0, 3.0]}
    with pytest.raises(ValueError, match="times"):
        common.time_stats([])
