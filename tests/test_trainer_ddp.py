"""The masked Trainer under DDP (two CPU processes, gloo): equal to the explicit masked computation
under the same DDP run, unselected weights bit-identical, both ranks identical."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist

    sys.path.insert(0, {tests!r})
    from helpers import tiny_model
    from trainer_patterns import GradDiffLike, assert_masked_update, random_mask, reference_of, run

    from wagle.integrations import masked

    mask = random_mask(tiny_model(), seed=11)
    kw = {{"max_grad_norm": 0.05, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}}
    ours, start, after = run(masked(GradDiffLike), {out!r} + "/a", mask, **kw)
    _, _, expected = run(reference_of(GradDiffLike, mask), {out!r} + "/b", **kw)
    assert type(ours.model_wrapped).__name__ == "DistributedDataParallel"
    assert_masked_update(mask, start, after, expected)
    flat = torch.cat([after[n].flatten() for n in sorted(after)])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(g, gathered[0]) for g in gathered)
    print("rank", dist.get_rank(), "ok")
    """
)


@pytest.mark.slow
def test_masked_trainer_under_ddp(tmp_path):
    script = tmp_path / "ddp_script.py"
    script.write_text(SCRIPT.format(tests=TESTS, out=str(tmp_path / "out")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count(" ok") == 2
