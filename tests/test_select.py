"""Exact top-k masks: both backends against a naive concatenate + stable-sort reference."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HAS_CUDA

from wagle.attribution import mask_from_gradients
from wagle_kernels.bitpack import unpack_bits
from wagle_kernels.scores import inverse_gamma, method_names, random_scores_torch

DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def naive_scores(method, w, gf, gr, gamma, seed, start):
    """Plain per-tensor formulas, independent of the library's score code (except the random hash)."""
    if method == "wagle":
        return ((w.float() - gr.float() * inverse_gamma(gamma)) * gf.float()).abs()
    if method == "snip":
        return (w.float() * gf.float()).abs()
    if method == "gradient":
        return gf.float().abs()
    if method == "magnitude":
        return w.float().abs()
    if method != "random":
        raise AssertionError(f"registered method {method!r} has no independent reference here: add one")
    positions = torch.arange(start, start + w.numel(), dtype=torch.int64).view(w.shape)
    return random_scores_torch(positions, seed)


def naive_masks(params, gf, gr, *, ratio, method, gamma=1e-6, scope="global", seed=0, nonfinite="lowest"):
    """Concatenate all scores, stable descending sort, take the first floor(ratio * N)."""
    scores, start = {}, 0
    for name, w in params.items():
        s = naive_scores(method, w, gf[name], gr[name], gamma, seed, start).reshape(-1).cpu()
        s = torch.where(torch.isfinite(s), s, torch.full_like(s, -1.0))
        scores[name] = s
        start += w.numel()

    def top(flat):
        k = math.floor(ratio * flat.numel())
        order = torch.sort(flat, descending=True, stable=True).indices
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[order[:k]] = True
        return chosen

    if scope == "per_tensor":
        return {name: top(s).view(params[name].shape) for name, s in scores.items()}
    chosen = top(torch.cat(list(scores.values())))
    out, offset = {}, 0
    for name, s in scores.items():
        out[name] = chosen[offset : offset + s.numel()].view(params[name].shape)
        offset += s.numel()
    return out


def make_inputs(shapes, dtypes=(torch.float32,), seed=0, tie_heavy=False):
    g = torch.Generator().manual_seed(seed)
    params, gf, gr = {}, {}, {}
    for i, (name, shape) in enumerate(shapes.items()):
        dtype = dtypes[i % len(dtypes)]
        w = torch.randn(shape, generator=g)
        f = torch.randn(shape, generator=g) * 1e-3
        r = torch.randn(shape, generator=g) * 1e-9
        if tie_heavy:
            w = w.round()
            f = (f * 1e3).round() * 1e-3
            f[torch.rand(shape, generator=g) < 0.5] = 0.0
        params[name], gf[name], gr[name] = (t.to(dtype).to(DEVICE) for t in (w, f, r))
    return params, gf, gr


SHAPES = {"embed": (37, 13), "q": (1000,), "empty": (0,), "one": (1,), "odd": (4099,), "norm": (7, 3, 5)}


def assert_same(mask, expected):
    for name, ref in expected.items():
        got = mask[name].cpu()
        assert got.shape == ref.shape, name
        assert torch.equal(got, ref), f"{name}: {int((got != ref).sum())} bits differ"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("ratio", [0.0, 0.37, 0.95, 1.0])
def test_matches_naive_reference(backend, method, ratio):
    params, gf, gr = make_inputs(SHAPES, seed=1)
    mask = mask_from_gradients(params, gf, gr, ratio=ratio, method=method, backend=backend, seed=11)
    expected = naive_masks(params, gf, gr, ratio=ratio, method=method, seed=11)
    assert_same(mask, expected)
    assert mask.num_selected == math.floor(ratio * mask.numel)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtypes", [(torch.bfloat16,), (torch.float16,), (torch.float32, torch.bfloat16, torch.float16)]
)
@pytest.mark.parametrize("method", ["wagle", "snip", "magnitude"])
def test_dtypes_and_mixes(backend, dtypes, method):
    params, gf, gr = make_inputs(SHAPES, dtypes=dtypes, seed=2)
    # mixed dtypes inside one tensor triple too: weights in bf16, gradients in fp32
    params = {k: v.to(torch.bfloat16) for k, v in params.items()}
    mask = mask_from_gradients(params, gf, gr, ratio=0.5, method=method, backend=backend)
    assert_same(mask, naive_masks(params, gf, gr, ratio=0.5, method=method))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.99])
def test_heavy_ties_broken_by_position(backend, scope, ratio):
    params, gf, gr = make_inputs(SHAPES, dtypes=(torch.bfloat16,), seed=3, tie_heavy=True)
    for method in ("gradient", "magnitude", "snip"):
        mask = mask_from_gradients(params, gf, gr, ratio=ratio, method=method, backend=backend, scope=scope)
        assert_same(mask, naive_masks(params, gf, gr, ratio=ratio, method=method, scope=scope))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_scores_equal(backend):
    shapes = {"a": (300,), "b": (0,), "c": (77,)}
    params = {k: torch.ones(s, device=DEVICE) for k, s in shapes.items()}
    zeros = {k: torch.zeros(s, device=DEVICE) for k, s in shapes.items()}
    mask = mask_from_gradients(params, zeros, zeros, ratio=0.5, backend=backend)
    flat = torch.cat([mask["a"].reshape(-1), mask["c"].reshape(-1)])
    assert flat[: 377 // 2].all() and not flat[377 // 2 :].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_tensors(backend):
    shapes = {f"layer{i}.weight": (int(n),) for i, n in enumerate(torch.randint(0, 200, (60,)))}
    params, gf, gr = make_inputs(shapes, dtypes=(torch.float32, torch.bfloat16), seed=4)
    for scope in ("global", "per_tensor"):
        mask = mask_from_gradients(params, gf, gr, ratio=0.3, backend=backend, scope=scope)
        assert_same(mask, naive_masks(params, gf, gr, ratio=0.3, method="wagle", scope=scope))


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_tensor_scope_counts(backend):
    params, gf, gr = make_inputs(SHAPES, seed=5)
    mask = mask_from_gradients(params, gf, gr, ratio=0.42, backend=backend, scope="per_tensor")
    for name, w in params.items():
        assert mask.selected(name) == math.floor(0.42 * w.numel())
    assert_same(mask, naive_masks(params, gf, gr, ratio=0.42, method="wagle", scope="per_tensor"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_scores(backend):
    params, gf, gr = make_inputs({"a": (64,), "b": (100,)}, seed=6)
    gf["b"][3] = float("nan")
    gf["b"][10] = float("inf")
    with pytest.raises(ValueError, match="'b'"):
        mask_from_gradients(params, gf, gr, ratio=0.5, backend=backend)
    mask, stats = mask_from_gradients(
        params, gf, gr, ratio=0.99, backend=backend, nonfinite="lowest", return_stats=True
    )
    assert stats.nonfinite == {"a": 0, "b": 2}
    assert not mask["b"].reshape(-1)[3] and not mask["b"].reshape(-1)[10]
    assert_same(mask, naive_masks(params, gf, gr, ratio=0.99, method="wagle"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fresh_random_inputs_bit_identical_backends(backend):
    for trial in range(3):
        shapes = {f"t{i}": (int(n),) for i, n in enumerate(torch.randint(1, 3000, (5,)))}
        params, gf, gr = make_inputs(shapes, dtypes=(torch.float32, torch.float16), seed=100 + trial)
        ratio = float(torch.rand(()))
        ref = mask_from_gradients(params, gf, gr, ratio=ratio, backend="torch")
        got = mask_from_gradients(params, gf, gr, ratio=ratio, backend=backend)
        for name in shapes:
            assert torch.equal(ref.packed(name).cpu(), got.packed(name).cpu())


def test_random_method_is_seeded_and_uniform():
    params = {"a": torch.zeros(20000)}
    m1 = mask_from_gradients(params, None, ratio=0.25, method="random", seed=7, backend="torch")
    m2 = mask_from_gradients(params, None, ratio=0.25, method="random", seed=7, backend="torch")
    m3 = mask_from_gradients(params, None, ratio=0.25, method="random", seed=8, backend="torch")
    assert torch.equal(m1["a"], m2["a"]) and not torch.equal(m1["a"], m3["a"])
    # selected positions are spread evenly over the tensor
    quarters = m1["a"].view(4, -1).sum(1).float()
    assert (quarters - 1250).abs().max() < 150
    u = random_scores_torch(torch.arange(100000), 3)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0 and abs(float(u.mean()) - 0.5) < 0.01


def test_packed_bits_layout():
    params = {"a": torch.arange(13, dtype=torch.float32)}
    mask = mask_from_gradients(params, None, ratio=5 / 13, method="magnitude", backend="torch")
    assert mask["a"].tolist() == [False] * 8 + [True] * 5
    assert unpack_bits(mask.packed("a"), 13).tolist() == mask["a"].tolist()
    assert mask.packed("a").tolist() == [0, 0b11111]


@pytest.mark.gpu
def test_gpu_large_tensor_int64_offsets():
    """More than 2^31 elements in one tensor: offsets and counts must be int64 (needs ~9 GB)."""
    n = 2**31 + 1000
    w = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    w.view(torch.int16).copy_(torch.randint(0, 2**14, (n,), device="cuda", dtype=torch.int16))
    w[-10:] = 1e30  # the largest values sit past 2^31
    mask = mask_from_gradients({"w": w}, None, ratio=10.5 / n, method="magnitude", backend="triton")
    assert mask.num_selected == 10
    assert bool(mask["w"][-10:].all())


@pytest.mark.gpu
def test_gpu_deterministic_and_matches_torch_backend():
    shapes = {f"t{i}": (1 << 20) + 7 * i for i in range(6)}
    params, gf, gr = make_inputs({k: (v,) for k, v in shapes.items()}, dtypes=(torch.bfloat16,), seed=9)
    masks = [mask_from_gradients(params, gf, gr, ratio=0.4, backend="triton") for _ in range(3)]
    ref = mask_from_gradients(params, gf, gr, ratio=0.4, backend="torch")
    for name in shapes:
        for m in masks:
            assert torch.equal(m.packed(name), ref.packed(name))


@pytest.mark.parametrize("seed", [0, 2**31 - 1, 2**31, 2**32 - 1])
def test_random_hash_identical_across_backends_for_any_seed(seed):
    params = {"a": torch.zeros(5000, device=DEVICE), "b": torch.zeros(17, device=DEVICE)}
    ref = mask_from_gradients(params, None, ratio=0.3, method="random", seed=seed, backend="torch")
    got = mask_from_gradients(params, None, ratio=0.3, method="random", seed=seed, backend="triton")
    for name in params:
        assert torch.equal(ref.packed(name).cpu(), got.packed(name).cpu())


@pytest.mark.parametrize("tie_heavy", [False, True])
@pytest.mark.parametrize("ratio", [0.05, 0.5, 0.97])
def test_triton_compaction_and_full_radix_paths_agree(tie_heavy, ratio):
    """The 2-pass candidate path and the full radix path (candidates disabled) give the torch masks."""
    from wagle_kernels.scores import inverse_gamma
    from wagle_kernels.select import (
        ScoreSource,
        ScoreSpec,
        SelectionStats,
        TorchSelector,
        TritonSelector,
        select_top_k,
    )

    params, gf, gr = make_inputs(SHAPES, dtypes=(torch.bfloat16,), seed=12, tie_heavy=tie_heavy)
    sources, start = [], 0
    for name, w in params.items():
        sources.append(
            ScoreSource(name, w.numel(), start, w.reshape(-1), gf[name].reshape(-1), gr[name].reshape(-1))
        )
        start += w.numel()
    spec = ScoreSpec("wagle", inverse_gamma(1e-6), 0)
    k = math.floor(ratio * start)
    expected = select_top_k(TorchSelector(sources, spec), k, start, SelectionStats())
    for fraction, block in ((1 / 32, 4096), (0.0, 4096), (1.0, 256)):
        stats = SelectionStats()
        got = select_top_k(
            TritonSelector(sources, spec, block=block, candidate_fraction=fraction), k, start, stats
        )
        if fraction == 0.0:
            assert not stats.compacted
        if fraction == 1.0:  # always fits: two input passes (or one histogram when the bin is taken whole)
            assert stats.histogram_passes == 1 and stats.input_passes == 2
        for name in params:
            assert torch.equal(got[name].cpu(), expected[name].cpu()), (fraction, name)


@pytest.mark.parametrize("tie_heavy", [False, True])
@pytest.mark.parametrize("ratio", [0.3, 0.9])
def test_selector_protocol_composes_across_shards(tie_heavy, ratio):
    """Both backends implement one protocol, and its local pieces compose: summed shard histograms +
    per-shard tie shares (exclusive prefix of tie counts) + write_masks give the single-selector masks."""
    from wagle_kernels.select import (
        ScoreSource,
        ScoreSpec,
        Selector,
        TorchSelector,
        TritonSelector,
        find_threshold,
        local_ties,
    )

    params, gf, gr = make_inputs(SHAPES, dtypes=(torch.bfloat16, torch.float32), seed=21, tie_heavy=tie_heavy)
    sources, start = [], 0
    for name, w in params.items():
        sources.append(
            ScoreSource(name, w.numel(), start, w.reshape(-1), gf[name].reshape(-1), gr[name].reshape(-1))
        )
        start += w.numel()
    spec = ScoreSpec("wagle", inverse_gamma(1e-6), 0)
    k = math.floor(ratio * start)
    expected = TorchSelector(sources, spec).select(k, start)
    shards = [sources[:2], sources[2:4], sources[4:]]
    for cls in (TorchSelector, TritonSelector):
        selectors = [cls(shard, spec) for shard in shards]
        assert all(isinstance(s, Selector) for s in selectors)

        def summed(*args, selectors=selectors):
            return sum(s.histogram(*args) for s in selectors)

        threshold, _ = find_threshold(summed, k, start)
        before, got = 0, {}
        for selector in selectors:
            got.update(selector.write_masks(local_ties(threshold, before)))
            before += selector.tie_count(threshold.key_threshold)
        for name in params:
            assert torch.equal(got[name].cpu(), expected[name].cpu()), (cls.__name__, name)
        assert sum(sum(s.nonfinite_counts().values()) for s in selectors) == 0
        assert all(s.stats.mask_passes == 1 for s in selectors)


@pytest.mark.parametrize("ratio", [0.5, 0.8, 0.99])
def test_zero_score_tie_needs_two_input_passes(ratio):
    """A huge tie of exactly-zero scores at the threshold (rows no forget token touched) is resolved in
    two passes over the inputs (histogram + mask, no tie pass), lower position first, and the mask
    carries the per-tensor counts the kernels made; NaN scores below the zeros stay unselected."""
    params, gf, gr = make_inputs(SHAPES, dtypes=(torch.bfloat16, torch.float16), seed=31)
    g = torch.Generator().manual_seed(4)
    for name in gf:
        flat = gf[name].view(-1)
        flat[torch.rand(flat.numel(), generator=g) < 0.45] = 0.0
    gf["q"].view(-1)[7] = float("nan")
    expected = naive_masks(params, gf, gr, ratio=ratio, method="wagle")
    got, stats = mask_from_gradients(
        params, gf, gr, ratio=ratio, backend="triton", nonfinite="lowest", return_stats=True
    )
    assert_same(got, expected)
    assert stats.input_passes == 2 and stats.tie_passes == 0
    for name in params:
        assert got.selected(name) == int(expected[name].sum()), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_selected_counts_match_the_bits(backend):
    """The counts the selection hands to the mask (no popcount) equal the bits it wrote."""
    from wagle_kernels.bitpack import popcount

    params, gf, gr = make_inputs(SHAPES, seed=5, tie_heavy=True)
    for ratio in (0.0, 0.3, 0.97, 1.0):
        mask = mask_from_gradients(params, gf, gr, ratio=ratio, backend=backend)
        for name in params:
            assert mask.selected(name) == popcount(mask.packed(name)), (ratio, name)
        assert mask.num_selected == math.floor(ratio * sum(w.numel() for w in params.values()))


MANY_SHAPES = {f"t{i}": ((0,), (1,), (37, 13), (300,), (4099,), (7, 3, 5))[i % 6] for i in range(40)}


@pytest.mark.parametrize("tie_heavy", [False, True])
@pytest.mark.parametrize("ratio", [0.05, 0.6, 0.97])
def test_launch_groups_give_the_torch_masks(tie_heavy, ratio):
    """Tensors grouped per launch (every group size, padded tuples, mixed dtypes across a group, empty
    tensors, several blocks per tensor) give the torch masks and per-tensor counts on every path:
    candidates, the full radix passes with tie pass, and the zero-score tie."""
    from wagle_kernels.select import (
        ScoreSource,
        ScoreSpec,
        SelectionStats,
        TorchSelector,
        TritonSelector,
        plan_launch_groups,
        select_top_k,
    )

    params, gf, gr = make_inputs(
        MANY_SHAPES, dtypes=(torch.bfloat16, torch.float32, torch.float16), seed=41, tie_heavy=tie_heavy
    )
    sources, start = [], 0
    for name, w in params.items():
        sources.append(
            ScoreSource(name, w.numel(), start, w.reshape(-1), gf[name].reshape(-1), gr[name].reshape(-1))
        )
        start += w.numel()
    # snip on the rounded tie-heavy inputs splits a tie of non-zero scores (the tie pass) at ratio 0.05
    spec = ScoreSpec("snip", 1.0, 0) if tie_heavy else ScoreSpec("wagle", inverse_gamma(1e-6), 0)
    k = math.floor(ratio * start)
    expected_stats = SelectionStats()
    expected = select_top_k(TorchSelector(sources, spec), k, start, expected_stats)
    nonempty = sum(1 for s in sources if s.numel)
    for max_tensors, fraction in ((16, 1 / 32), (3, 0.0), (1, 1.0), (7, 1 / 32)):
        selector = TritonSelector(
            sources, spec, block=256, candidate_fraction=fraction, max_tensors=max_tensors
        )
        assert len(selector.groups) == math.ceil(nonempty / max_tensors)
        stats = SelectionStats()
        got = select_top_k(selector, k, start, stats)
        for name in params:
            assert torch.equal(got[name].cpu(), expected[name].cpu()), (max_tensors, fraction, name)
        assert stats.selected == expected_stats.selected, (max_tensors, fraction)
        if tie_heavy and ratio == 0.05 and fraction == 0.0:
            assert stats.tie_passes == 1, stats
    groups = plan_launch_groups([5, 0, 300, 7, 9], 256, 2, alone=[False, False, True, False, False])
    assert [g.indices for g in groups] == [(0,), (2,), (3, 4)]
    assert [(g.first_items, g.items, g.block_base) for g in groups] == [
        ((0,), 1, 0),
        ((0,), 2, 1),
        ((0, 1), 2, 3),
    ]
