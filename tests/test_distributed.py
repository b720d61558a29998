"""Multi-process checks on gloo (127.0.0.1): one job imports the modules once and forks the ranks of
world sizes 2 and 3 (tests/distributed/worker.py); the tests below read what the ranks wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from wagle import WeightMask
from wagle.distributed import load_sharded

WORKER = os.path.join(os.path.dirname(__file__), "distributed", "worker.py")
WORLDS = (2, 3)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("distributed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, WORKER, str(out), *map(str, WORLDS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = {}
    for world in WORLDS:
        with open(out / f"world{world}" / "results.json") as handle:
            results[world] = json.load(handle)
    return out, results


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("method", ["wagle", "snip", "random"])
def test_fsdp_attribution_equals_one_device(job, world, method):
    assert job[1][world][f"fsdp_{method}"]


@pytest.mark.parametrize("world", WORLDS)
def test_fsdp_attribution_leaves_the_model_as_it_was(job, world):
    results = job[1][world]
    assert results["settings_restored"] and results["params_unchanged"] and results["local_matches"]


@pytest.mark.parametrize("case", ["npo", "grad_diff"])
def test_fsdp_unlearn_equals_one_device(job, case):
    results = job[1][2]
    assert results[f"unlearn_{case}_moved"]  # the one-device run changed the weights
    assert results[f"unlearn_{case}"] and results[f"unlearn_{case}_history"]  # bit for bit


def test_fsdp_unlearn_more_micro_batches_than_ranks_within_tolerance(job):
    results = job[1][2]  # 4 micro-batches on 2 ranks: the gradient terms are added in another order
    assert results["unlearn_grad_diff_accum4_moved"] and results["unlearn_grad_diff_accum4_history"]
    assert results["unlearn_grad_diff_accum4_max_diff"] < 1e-6


def test_fsdp_unlearn_resume_equals_uninterrupted(job):
    results = job[1][2]
    assert results["unlearn_resumed_from"] == 2 and results["unlearn_resume"]
    assert results["unlearn_mismatch_refused"]


def test_fsdp_empty_shards_at_world_3(job):
    assert job[1][3]["empty_shard"]


@pytest.mark.parametrize("world", WORLDS)
def test_fsdp_offload_and_gradient_checkpointing(job, world):
    assert job[1][world]["fsdp_offload_checkpointing"]


@pytest.mark.parametrize("world", WORLDS)
def test_ddp_attribution_equals_one_device(job, world):
    assert job[1][world]["ddp"]


@pytest.mark.parametrize("world", WORLDS)
def test_sharded_save_loads_at_world_1_and_other_sizes(job, world):
    folder = job[0] / f"world{world}"
    single = WeightMask.load(folder / "one_device_mask.safetensors")
    full = load_sharded(folder / "sharded_mask")
    assert list(full) == list(single) and full.metadata == single.metadata
    assert all(torch.equal(full.packed(n), single.packed(n)) for n in single)
    for other in (2, 5):  # the same folder read as the shards of another world size
        for rank in range(other):
            ranges = {}
            for name in single:
                n = single[name].numel()
                size = -(-n // other)
                lo = min(rank * size, n)
                ranges[name] = (lo, min(n, lo + size) - lo)
            part = load_sharded(folder / "sharded_mask", ranges, rank=rank, world_size=other)
            for name, (lo, num) in ranges.items():
                assert torch.equal(part.local()[name], single[name].reshape(-1)[lo : lo + num])


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("config", ["adamw_dense", "adamw_compact", "sgd_momentum"])
def test_masked_optimizer_steps_on_fsdp2_equal_one_device(job, world, config):
    results = job[1][world]
    assert results[f"{config}_moved"]  # the one-device steps changed the weights
    assert results[config]  # two steps with weight decay and clipping, bit for bit
    assert results[f"{config}_digest"]  # the state_dict's mask digest is global
    assert results[f"{config}_local_state"]  # moments are plain local-shaped tensors


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("config", ["adamw_dense", "adamw_compact", "sgd_momentum"])
def test_masked_optimizer_resumes_from_torch_distributed_checkpoint(job, world, config):
    assert job[1][world][f"{config}_resume"]


@pytest.mark.parametrize("world", WORLDS)
def test_wagle_mask_command_under_torchrun_equals_one_device(job, world):
    results = job[1][world]
    assert results["cli_single_exit"] == 0 and results["cli_sharded_exits"] == [0] * world
    folder = job[0] / f"world{world}" / "cli"
    single = WeightMask.load(folder / "single.safetensors")
    sharded = WeightMask.load(folder / "sharded.safetensors")
    assert list(single) == list(sharded) and single.metadata == sharded.metadata
    assert all(torch.equal(single.packed(n), sharded.packed(n)) for n in single)


@pytest.mark.parametrize("world", WORLDS)
def test_wagle_unlearn_command_under_torchrun_equals_one_device(job, world):
    from safetensors.torch import load_file

    results = job[1][world]
    assert results["cli_unlearn_single_exit"] == 0
    assert results["cli_unlearn_first_exits"] == results["cli_unlearn_resumed_exits"] == [0] * world
    folder = job[0] / f"world{world}" / "cli"
    single = load_file(folder / "u_single" / "model" / "model.safetensors")
    start = load_file(folder / "model" / "model.safetensors")
    assert not all(torch.equal(single[k], start[k]) for k in single)
    for run in ("u_first", "u_resumed"):  # the run, and its resume from the last checkpoint
        sharded = load_file(folder / run / "model.safetensors")
        assert sorted(sharded) == sorted(single) and all(torch.equal(sharded[k], single[k]) for k in single)
