"""Sharded selection simulated in one process: W ranks as threads, collectives summing per-rank tensors.

Every parameter is cut into per-rank segments at arbitrary offsets (empty, mid-tensor, whole); the
masks assembled from all ranks must equal ``mask_from_gradients`` on the full tensors bit for bit.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch

from wagle import mask_from_gradients
from wagle.distributed import Segment, ShardedMask, load_sharded, select_segments
from wagle.distributed.comm import CommStats

METHODS = ("wagle", "snip", "gradient", "magnitude", "random")


class ThreadGroup:
    """Shared slots and a barrier: the ranks of a simulated process group."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.slots: list = [None] * world_size
        self.barrier = threading.Barrier(world_size)
        self.turn = threading.Lock()  # one rank runs at a time (the Triton interpreter is not thread-safe)


class FakeCollectives:
    """One rank's collectives over a :class:`ThreadGroup` (sums in rank order)."""

    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank, self.world_size = group, rank, group.world_size
        self.stats = CommStats()

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.group.slots[self.rank] = tensor.clone()
        self.group.turn.release()
        try:
            self.group.barrier.wait()
            out = [t.clone() for t in self.group.slots]
            self.group.barrier.wait()
        finally:
            self.group.turn.acquire()
        return out

    def all_reduce_sum(self, tensor):
        self.stats.count("all_reduce", tensor)
        parts = self._exchange(tensor)
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return total

    def all_gather(self, tensor):
        self.stats.count("all_gather", tensor)
        return self._exchange(tensor)

    def broadcast(self, tensor, src=0):
        self.stats.count("broadcast", tensor)
        return self._exchange(tensor)[src]


def run_ranks(world_size: int, fn):
    """Run ``fn(comm)`` on ``world_size`` threads; returns the per-rank results (re-raises errors)."""
    group = ThreadGroup(world_size)
    results, errors = [None] * world_size, []

    def target(rank):
        group.turn.acquire()
        try:
            results[rank] = fn(FakeCollectives(group, rank))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            group.barrier.abort()
        finally:
            group.turn.release()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


def make_tensors(seed: int = 0, ties: bool = False):
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed": (13, 5), "norm": (1,), "w1": (7, 9), "bias": (3,), "w2": (4, 4, 3)}
    params, gf, gr = {}, {}, {}
    for name, shape in shapes.items():
        params[name] = torch.randn(shape, generator=g)
        gf[name] = torch.randn(shape, generator=g) * 1e-3
        gr[name] = torch.randn(shape, generator=g) * 1e-9
        if ties:  # heavy ties: quantised values and whole rows of exact zeros
            params[name] = (params[name] * 2).round() / 2
            gf[name] = (gf[name] * 2e3).round() / 2e3
            gr[name] = torch.zeros(shape)
            gf[name].view(-1)[: max(1, gf[name].numel() // 3)] = 0
    return params, gf, gr


def cuts(numel: int, world: int, g: torch.Generator, style: str) -> list[tuple[int, int]]:
    """Per-rank (offset, numel) ranges covering [0, numel): torch.chunk-like or arbitrary splits."""
    if style == "chunk":
        size = -(-numel // world)
        return [
            (min(r * size, numel), max(0, min(numel, (r + 1) * size) - min(r * size, numel)))
            for r in range(world)
        ]
    points = sorted(torch.randint(0, numel + 1, (world - 1,), generator=g).tolist())
    bounds = [0, *points, numel]
    return [(bounds[r], bounds[r + 1] - bounds[r]) for r in range(world)]


def sharded_mask(params, gf, gr, world, style, cut_seed=0, **kw):
    g = torch.Generator().manual_seed(int(cut_seed))
    shapes = {n: tuple(t.shape) for n, t in params.items()}
    plan = {n: cuts(t.numel(), world, g, style) for n, t in params.items()}

    def work(comm):
        segs = []
        for name in shapes:
            off, num = plan[name][comm.rank]
            if style == "sparse" and num == 0:
                continue  # a rank may also hold no segment of a parameter at all
            sl = slice(off, off + num)
            segs.append(
                Segment(
                    name,
                    off,
                    num,
                    params[name].reshape(-1)[sl],
                    gf[name].reshape(-1)[sl],
                    gr[name].reshape(-1)[sl],
                )
            )
        return select_segments(shapes, segs, comm=comm, return_stats=True, **kw)

    results = run_ranks(world, work)
    # assemble: the gather collective on the parts of every rank
    gathered = run_ranks(world, lambda comm: results[comm.rank][0].gather(comm))
    for other in gathered[1:]:
        assert_same(other, gathered[0])
    return gathered[0], results


def assert_same(a, b):
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a.packed(name), b.packed(name)), name
    assert a.metadata == b.metadata


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_sharded_equals_one_device(method, scope):
    params, gf, gr = make_tensors(1)
    for world, style in ((2, "chunk"), (3, "random"), (4, "sparse")):
        for ratio in (0.0, 0.1, 0.5, 0.95, 1.0):
            kw = {"ratio": ratio, "method": method, "scope": scope, "backend": "torch"}
            if method == "random":
                kw["seed"] = 7
            expected = mask_from_gradients(params, gf, gr, **kw)
            got, _ = sharded_mask(params, gf, gr, world, style, cut_seed=world, **kw)
            assert_same(got, expected)


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_sharded_ties_and_all_equal(scope):
    params, gf, gr = make_tensors(2, ties=True)
    for method in ("wagle", "snip", "gradient", "magnitude"):
        for ratio in (0.3, 0.5, 0.77, 0.9):
            kw = {"ratio": ratio, "method": method, "scope": scope, "backend": "torch"}
            expected = mask_from_gradients(params, gf, gr, **kw)
            for world, style in ((2, "random"), (3, "random"), (5, "sparse")):
                got, results = sharded_mask(params, gf, gr, world, style, cut_seed=ratio * 100, **kw)
                assert_same(got, expected)
    zeros = {n: torch.zeros_like(t) for n, t in params.items()}
    for ratio in (0.25, 0.6):
        kw = {"ratio": ratio, "method": "gradient", "scope": scope, "backend": "torch"}
        got, results = sharded_mask(params, zeros, zeros, 3, "random", **kw)
        assert_same(got, mask_from_gradients(params, zeros, zeros, **kw))
        assert all(stats.tie_gathers == 1 for _, stats in results)


def test_random_seed_is_agreed_and_recorded():
    params, gf, gr = make_tensors(3)
    torch.manual_seed(0)
    got, results = sharded_mask(params, gf, gr, 3, "random", ratio=0.4, method="random", backend="torch")
    seed = int(got.metadata["seed"])
    assert_same(got, mask_from_gradients(params, None, None, ratio=0.4, method="random", seed=seed))


def test_communication_does_not_grow_with_weights():
    sent = []
    for scale in (1, 8):
        g = torch.Generator().manual_seed(0)
        params = {"a": torch.randn(100 * scale, generator=g), "b": torch.randn(37 * scale, 3, generator=g)}
        grads = {n: torch.randn(t.shape, generator=g) for n, t in params.items()}
        _, results = sharded_mask(
            params, grads, grads, 2, "random", ratio=0.3, method="snip", backend="torch"
        )
        stats = results[0][1]
        assert stats.radix_passes >= 1
        sent.append((stats.comm.all_reduce_bytes, stats.comm.all_gather_bytes))
    assert sent[0] == sent[1]
    assert sent[0][0] <= (2048 + 2 * 1024 + 2) * 8


def test_nonfinite_is_reported_on_every_rank():
    params, gf, gr = make_tensors(4)
    gf["w1"].view(-1)[40] = float("nan")
    with pytest.raises(ValueError, match="non-finite attribution score: 1 NaN/Inf score.*'w1'"):
        sharded_mask(params, gf, gr, 2, "chunk", ratio=0.5, method="snip", backend="torch")
    got, results = sharded_mask(
        params, gf, gr, 3, "random", ratio=0.5, method="snip", backend="torch", nonfinite="lowest"
    )
    assert_same(got, mask_from_gradients(params, gf, gr, ratio=0.5, method="snip", nonfinite="lowest"))
    assert results[0][1].nonfinite["w1"] == 1


def test_segment_errors():
    params, gf, gr = make_tensors(0)
    shapes = {n: tuple(t.shape) for n, t in params.items()}

    def call(segs):
        return run_ranks(
            1, lambda comm: select_segments(shapes, segs, ratio=0.5, method="magnitude", comm=comm)
        )

    with pytest.raises(ValueError, match="'nope' is not in shapes"):
        call([Segment("nope", 0, 1, torch.zeros(1))])
    with pytest.raises(ValueError, match=r"range \[60, 70\) of 'embed' lies outside its 65 elements"):
        call([Segment("embed", 60, 10, torch.zeros(10))])
    with pytest.raises(ValueError, match="'norm': weight has 2 elements, the segment 1"):
        call([Segment("norm", 0, 1, torch.zeros(2))])
    with pytest.raises(ValueError, match="'norm': weight is missing"):
        call([Segment("norm", 0, 1)])
    with pytest.raises(ValueError, match="'norm' has two segments"):
        call([Segment("norm", 0, 1, torch.zeros(1)), Segment("norm", 0, 1, torch.zeros(1))])
    with pytest.raises(ValueError, match="segments of 'embed' hold 0 of its 65 elements"):
        call([])
    with pytest.raises(ValueError, match="mask parts of 'embed' cover 0 of the 65"):
        run_ranks(1, lambda comm: ShardedMask(shapes, {}).gather(comm))


def test_triton_backend_through_the_same_wrapper():
    pytest.importorskip("triton")
    params, gf, gr = make_tensors(5, ties=True)
    for method, scope, ratio in (
        ("wagle", "global", 0.4),
        ("snip", "per_tensor", 0.77),
        ("random", "global", 0.5),
    ):
        kw = {"ratio": ratio, "method": method, "scope": scope, "seed": 3}
        expected = mask_from_gradients(params, gf, gr, backend="torch", **kw)
        got, _ = sharded_mask(params, gf, gr, 3, "random", backend="triton", **kw)
        assert_same(got, expected)


def test_save_load_any_world_size(tmp_path):
    params, gf, gr = make_tensors(6)
    kw = {"ratio": 0.45, "method": "wagle", "backend": "torch"}
    full = mask_from_gradients(params, gf, gr, **kw)
    g = torch.Generator().manual_seed(1)
    plan = {n: cuts(t.numel(), 3, g, "random") for n, t in params.items()}
    folder = tmp_path / "sharded"

    def save(comm):
        ranges = {n: plan[n][comm.rank] for n in params}
        part = ShardedMask.from_mask(full, ranges, rank=comm.rank, world_size=3)
        part.save(folder, comm)

    run_ranks(3, save)
    assert sorted(os.listdir(folder)) == [
        "mask-00000-of-00003.safetensors",
        "mask-00001-of-00003.safetensors",
        "mask-00002-of-00003.safetensors",
        "mask.index.json",
    ]
    assert_same(load_sharded(folder), full)  # world size 1: the single-file mask
    single = tmp_path / "single.safetensors"
    full.save(single)
    for source in (folder, single):  # any world size, from the folder or the single file
        ranges = {n: (2, t.numel() - 5) for n, t in params.items() if t.numel() > 6}
        part = load_sharded(source, ranges)
        for name, (off, num) in ranges.items():
            assert torch.equal(part.local()[name], full[name].reshape(-1)[off : off + num])
    with pytest.raises(FileNotFoundError, match="no mask.index.json"):
        load_sharded(tmp_path)
    (folder / "mask-00001-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="a file of the sharded mask is missing"):
        load_sharded(folder)


def test_deepspeed_models_are_refused_with_what_is_supported():
    import wagle

    model = torch.nn.Linear(3, 2)
    model.weight.ds_id = 0  # what DeepSpeed ZeRO puts on the parameters it partitions
    with pytest.raises(TypeError, match="DeepSpeed models are not supported.*FSDP2.*DistributedDataParallel"):
        wagle.attribute(model, [], ratio=0.5, method="magnitude")
    mask = wagle.WeightMask.from_dict(
        {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    )
    with pytest.raises(TypeError, match="'weight' is a DeepSpeed ZeRO parameter. DeepSpeed models are not"):
        wagle.MaskedAdamW(model.named_parameters(), mask)


def test_sharded_mask_on_plain_parameters_is_refused():
    params, _, _ = make_tensors(0)
    sharded = ShardedMask({n: tuple(t.shape) for n, t in params.items()}, {})
    import wagle

    with pytest.raises(TypeError, match="ShardedMask holds one rank's bits; the parameters are not DTensors"):
        wagle.MaskedAdamW(list(params.items()), sharded)


def test_unlearn_refuses_deepspeed_models():
    import wagle

    model = torch.nn.Linear(3, 2)
    model.weight.ds_id = 0
    with pytest.raises(TypeError, match="DeepSpeed models are not supported"):
        wagle.unlearn(model, [], None, tokenizer=None, method="grad_ascent", steps=1)
