"""Counted memory traffic stays near the floor (regression check; Triton interpreter, see
benchmarks/traffic.py for the counting model).

Sizes are a scaled-down Llama-2 layer (330K weights) so the interpreter finishes in seconds. Bounds:
the mask pipeline including the torch code around the kernels <= 2.2x its floor in the common case and
<= 2.6x with a huge tie of exactly-zero scores (measured: 2.17x and 2.01x; two reads of the inputs are
1.98x), two passes over the inputs, a constant number of host syncs, and per pass one launch per group
of up to 16 tensors; masked AdamW within 2% of its layout's floor, with the mask bits requested once
per byte.
"""

from __future__ import annotations

import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import traffic  # noqa: E402

from wagle_kernels.multi_tensor import MAX_TENSORS_PER_LAUNCH  # noqa: E402

REASON = traffic.supported()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"traffic counting unavailable: {REASON}")

SHAPES = traffic.scaled_llama_shapes(hidden=128, intermediate=344, vocab=512) if REASON is None else {}


@pytest.mark.parametrize(("case", "ratio", "bound"), [("common", 0.5, 2.2), ("tie_heavy", 0.95, 2.6)])
def test_mask_pipeline_traffic(case, ratio, bound):
    row = traffic.measure_mask(SHAPES, case, ratio)
    assert row["selected"] == int(ratio * row["numel"])
    assert row["input_passes"] == 2, row
    assert row["total_x_floor"] <= bound, row
    assert row["host_syncs"] <= 6, row["sync_ops"]  # constant, not one per tensor
    groups = math.ceil(row["tensors"] / MAX_TENSORS_PER_LAUNCH)
    assert row["kernel_launches"] <= 2 * groups + 3, row["kernels"]


def test_launches_per_selection_grow_with_tensor_groups():
    """Over Llama-2-7B's 291 tensors: two passes of ceil(291 / 16) = 19 launches, plus at most three on
    the candidates, in both cases."""
    counts = traffic.launches_per_selection()
    groups = math.ceil(counts["tensors"] / MAX_TENSORS_PER_LAUNCH)
    assert counts["tensors"] == 291 and groups == 19
    for case in ("mask_common", "mask_tie_heavy"):
        assert counts[case]["kernel_launches"] <= 2 * groups + 3, counts[case]
        assert counts[case]["host_syncs"] <= 6, counts[case]


@pytest.mark.parametrize("layout", ["dense", "compact", "auto"])
def test_optimizer_traffic(layout):
    shapes = traffic.scaled_llama_shapes(hidden=64, intermediate=172, vocab=256)
    row = traffic.measure_optimizer(shapes, layout, 0.5)
    assert row["kernel_x_floor"] <= 1.02, row
    # the lanes ask for no more than the floor: each mask byte once, not once per element (+7/8 B/w)
    assert row["bytes"]["kernel_requested"] / row["numel"] <= 1.01 * row["floor_bytes_per_weight"], row
    assert row["kernel_launches"] == 1, row


@pytest.mark.parametrize("ratio", [0.5, 0.9999])
def test_auto_layout_moves_no_more_bytes_than_either(ratio):
    """``state_layout="auto"``: the counted step traffic and the state + metadata memory are at most
    those of the better of dense and compact (compact up to 99.95% selected, dense above)."""
    shapes = traffic.scaled_llama_shapes(hidden=64, intermediate=172, vocab=256)
    rows = {
        layout: traffic.measure_optimizer(shapes, layout, ratio) for layout in ("dense", "compact", "auto")
    }
    moved = {k: r["kernel_bytes_per_weight"] for k, r in rows.items()}
    assert moved["auto"] <= min(moved["dense"], moved["compact"]) * 1.001, moved
    memory = {k: r["state_bytes"] + r["metadata_bytes"] for k, r in rows.items()}
    assert memory["auto"] <= min(memory["dense"], memory["compact"]), memory


def test_counting_model_on_a_known_kernel():
    """A copy kernel: sectors of its loads and stores are exactly the bytes copied, atomics to one
    address count one sector per launch, and a torch op counts its inputs and outputs."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def copy(x, y, counter, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y + offs, tl.load(x + offs, mask=offs < n), mask=offs < n)
        tl.atomic_add(counter, 1)

    x = torch.arange(1000, dtype=torch.float32)
    y = torch.empty_like(x)
    c = torch.zeros(1, dtype=torch.int32)
    with traffic.count_traffic() as t:
        copy[(8,)](x, y, c, 1000, BLOCK=128)
        z = x + 1
        int(c.item())
    assert torch.equal(y, x) and int(c) == 8 and torch.equal(z, x + 1)
    assert t.kernel_read == 4000 and t.kernel_write == 4000  # 1000 fp32 = 125 sectors each
    assert t.kernel_atomic == 32 and t.atomic_ops == 8
    assert t.torch_read == 4000 and t.torch_write == 4000 and t.torch_ops == 1
    assert t.kernel_launches == 1 and t.host_syncs == 1
