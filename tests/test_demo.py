"""``wagle demo``: the report is the same whatever the caller's torch thread count and the number of
worker processes; seeds and learning rates make a table of mean+-std cells and a frontier plot."""

from __future__ import annotations

import json

import pytest
import torch

from wagle.demo import DemoConfig, run
from wagle.errors import UserError

TIMING_KEYS = ("timings_seconds", "cpu_seconds", "workers", "config", "model_stats")


def _values(report: dict) -> dict:
    """Everything the report measured, without timings and the worker count."""
    kept = {k: v for k, v in report.items() if k not in TIMING_KEYS}
    kept["runs"] = [{k: v for k, v in r.items() if k != "seconds"} for r in report["runs"]]
    return json.loads(json.dumps(kept, default=str))


def test_quick_demo_is_independent_of_threads_and_workers(tmp_path):
    previous = torch.get_num_threads()
    reports = {}
    try:
        for threads, workers in ((1, 1), (2, 2)):
            torch.set_num_threads(threads)
            config = DemoConfig.quick()
            config.workers = workers
            reports[workers] = run(config, out_dir=str(tmp_path / f"w{workers}"), progress=False)
            assert torch.get_num_threads() == threads  # the caller's setting is restored
    finally:
        torch.set_num_threads(previous)
    one, two = reports[1], reports[2]
    assert one["workers"] == 1 and two["workers"] == 2 and one["torch_threads"] == two["torch_threads"] == 1
    assert _values(one) == _values(two)

    config = DemoConfig.quick()
    assert len(one["runs"]) == 3 * len(config.lrs) * len(config.seeds)
    assert all(r["status"] == "ok" for r in one["runs"])
    assert {c["method"] for c in one["cells"]} == {"dense", "wagle", "random"}
    assert all(c["seeds"] == list(config.seeds) for c in one["cells"])
    assert "+-" in one["table"] and "(retain model)" in one["table"]
    assert set(one["results"]) == {"retain model", "target", "NPO", "NPO+WAGLE", "NPO+random"}
    assert set(one["frontiers"]["npo"]["forget_quality"]) == {"dense", "wagle", "random"}
    for name in ("frontier.png", "tradeoff.png", "privacy.png", "mask_densities.png"):
        assert (tmp_path / "w2" / name).read_bytes()[:4] == b"\x89PNG"
    written = json.loads((tmp_path / "w1" / "report.json").read_text())
    assert written["torch_threads"] == 1 and written["table"] == one["table"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lr": 7e-4}, "lr: must be one of lrs"),
        ({"workers": 0}, "workers"),
        ({"num_threads": 0}, "num_threads"),
        ({"seeds": (0, 0)}, "seeds"),
        ({"forget_split": "forget20"}, "forget_split"),
    ],
)
def test_demo_config_errors(tmp_path, change, message):
    config = DemoConfig.quick()
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(UserError, match=message):
        run(config, out_dir=str(tmp_path), progress=False)
