"""WeightMask: bit packing, dict/file round trips, compatibility; mask_from_gradients input errors."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from wagle import WeightMask, mask_from_gradients
from wagle.mask import MaskMismatchError
from wagle_kernels.bitpack import pack_bits, packed_size, popcount, unpack_bits


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 65, 1000, 4099])
def test_pack_unpack_round_trip(n):
    bits = torch.rand(n) < 0.3
    packed = pack_bits(bits, chunk=16)
    assert packed.numel() == packed_size(n)
    assert torch.equal(unpack_bits(packed, n), bits)
    assert popcount(packed) == int(bits.sum())


def test_pack_matches_numpy_little_endian():
    import numpy as np

    bits = torch.rand(77) < 0.5
    expected = np.packbits(bits.numpy(), bitorder="little")
    assert pack_bits(bits).numpy().tolist() == expected.tolist()


def sample_dict():
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.rand(11, 7, generator=g) < 0.5,
        "model.norm.weight": torch.rand(7, generator=g) < 0.9,
        "empty": torch.zeros(0, 3, dtype=torch.bool),
        "one": torch.tensor([True]),
    }


def test_dict_round_trip_and_accessors():
    d = sample_dict()
    mask = WeightMask.from_dict(d)
    assert mask.names == list(d)
    for name, value in d.items():
        assert torch.equal(mask[name], value)
    back = mask.to_dict()
    assert all(torch.equal(back[k], d[k]) for k in d)
    assert mask.numel == sum(v.numel() for v in d.values())
    assert mask.num_selected == sum(int(v.sum()) for v in d.values())
    assert mask.density == pytest.approx(mask.num_selected / mask.numel)
    assert mask.densities()["one"] == 1.0 and mask.densities()["empty"] == 0.0
    assert "total" in mask.summary()
    assert len(mask) == 4 and "one" in mask


def test_from_dict_accepts_float_masks_like_the_reference_release():
    mask = WeightMask.from_dict({"w": torch.tensor([[1.0, 0.0], [0.0, 1.0]])})
    assert mask["w"].tolist() == [[True, False], [False, True]]


def test_save_load_round_trip_atomic(tmp_path):
    mask = WeightMask.from_dict(sample_dict(), metadata={"method": "wagle"})
    path = tmp_path / "sub" / "mask.safetensors"
    mask.save(path)
    assert not [f for f in os.listdir(path.parent) if f.startswith(".tmp-")]
    loaded = WeightMask.load(path)
    assert loaded.names == mask.names and loaded.metadata["method"] == "wagle"
    for name in mask:
        assert torch.equal(loaded[name], mask[name])
    # loading against the right model shapes passes, against another model fails clearly
    shapes = {name: torch.empty(mask.shape(name)) for name in mask}
    WeightMask.load(path, shapes)
    shapes["model.norm.weight"] = torch.empty(8)
    with pytest.raises(MaskMismatchError, match="model.norm.weight"):
        WeightMask.load(path, shapes)
    with pytest.raises(MaskMismatchError, match="not found"):
        WeightMask.load(path, {"other.weight": torch.empty(3)})


def test_load_rejects_foreign_or_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        WeightMask.load(tmp_path / "nope.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(3)}, str(other))
    with pytest.raises(ValueError, match="not a wagle mask"):
        WeightMask.load(other)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a file")
    with pytest.raises(ValueError):
        WeightMask.load(garbage)


def test_mask_from_model_module_compatibility():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    params = dict(model.named_parameters())
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    mask = mask_from_gradients(params, grads, grads, ratio=0.5)
    mask.check_compatible(model, require_all=True)
    with pytest.raises(MaskMismatchError):
        mask.check_compatible(torch.nn.Linear(4, 3))


def test_constructor_validates_packed_bits():
    with pytest.raises(ValueError, match="bytes"):
        WeightMask({"w": ((10,), torch.zeros(1, dtype=torch.uint8))})
    with pytest.raises(ValueError, match="padding"):
        WeightMask({"w": ((3,), torch.tensor([0b1000], dtype=torch.uint8))})


# ---- mask_from_gradients input errors -------------------------------------------------------
def inputs():
    p = {"a": torch.randn(4, 3), "b": torch.randn(5)}
    g = {k: torch.randn_like(v) for k, v in p.items()}
    return p, g, {k: torch.randn_like(v) for k, v in p.items()}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": float("nan")}, "ratio"),
        ({"ratio": 0.5, "gamma": 0.0}, "gamma"),
        ({"ratio": 0.5, "gamma": -1.0}, "gamma"),
        ({"ratio": 0.5, "method": "nope"}, "method"),
        ({"ratio": 0.5, "scope": "layer"}, "scope"),
        ({"ratio": 0.5, "backend": "cuda"}, "backend"),
        ({"ratio": 0.5, "nonfinite": "ignore"}, "nonfinite"),
        ({"ratio": 0.5, "seed": -1}, "seed"),
    ],
)
def test_bad_options(kwargs, match):
    p, gf, gr = inputs()
    with pytest.raises(ValueError, match=match):
        mask_from_gradients(p, gf, gr, **kwargs)


def test_bad_tensors():
    p, gf, gr = inputs()
    with pytest.raises(ValueError, match="grad_forget.*missing"):
        mask_from_gradients(p, {"a": gf["a"]}, gr, ratio=0.5)
    with pytest.raises(ValueError, match=r"grad_retain\['b'\].*shape"):
        mask_from_gradients(p, gf, {**gr, "b": torch.randn(6)}, ratio=0.5)
    with pytest.raises(ValueError, match=r"grad_forget\['a'\].*None"):
        mask_from_gradients(p, {**gf, "a": None}, gr, ratio=0.5)
    with pytest.raises(TypeError, match=r"params\['a'\].*int64"):
        mask_from_gradients({**p, "a": torch.ones(4, 3, dtype=torch.int64)}, gf, gr, ratio=0.5)
    with pytest.raises(TypeError, match="complex"):
        mask_from_gradients(p, {**gf, "b": torch.randn(5, dtype=torch.complex64)}, gr, ratio=0.5)
    with pytest.raises(ValueError, match="grad_retain"):
        mask_from_gradients(p, gf, None, ratio=0.5, method="wagle")
    with pytest.raises(ValueError, match="grad_forget"):
        mask_from_gradients(p, None, None, ratio=0.5, method="snip")
    with pytest.raises(TypeError, match="mapping"):
        mask_from_gradients(torch.nn.Linear(2, 2), gf, gr, ratio=0.5)
    mask_from_gradients(p, None, None, ratio=0.5, method="magnitude")  # needs neither gradient


def test_meta_device_mix_is_rejected():
    p, gf, gr = inputs()
    with pytest.raises(ValueError, match="different devices.*host_gradients"):
        mask_from_gradients(p, {**gf, "a": gf["a"].to("meta")}, gr, ratio=0.5)


def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    p, gf, gr = inputs()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        mask_from_gradients(p, gf, gr, ratio=0.5, backend="triton")


def test_named_parameters_iterable_and_metadata():
    model = torch.nn.Linear(5, 4)
    grads = {k: torch.randn_like(v) for k, v in model.named_parameters()}
    mask = mask_from_gradients(model.named_parameters(), grads, grads, ratio=0.25, seed=1)
    assert mask.names == ["weight", "bias"]
    assert mask.metadata["method"] == "wagle" and mask.metadata["ratio"] == "0.25"
    assert mask.num_selected == 6


def test_to_device_copy_keeps_bits_counts_and_metadata():
    mask = WeightMask.from_dict(sample_dict(), metadata={"method": "wagle"})
    moved = mask.to("cpu")
    assert moved is not mask and moved.names == mask.names and moved.metadata == mask.metadata
    assert moved.num_selected == mask.num_selected and moved.densities() == mask.densities()
    for name in mask:
        assert torch.equal(moved[name], mask[name])


def test_saved_masks_are_reproducible_and_only_random_records_a_seed(tmp_path):
    g = torch.Generator().manual_seed(4)
    params = {"a": torch.randn(300, generator=g), "b": torch.randn(7, 3, generator=g)}
    grads = {n: torch.randn(p.shape, generator=g) for n, p in params.items()}
    paths = []
    for i in range(2):
        mask = mask_from_gradients(params, grads, grads, ratio=0.4, backend="torch")
        assert "seed" not in mask.metadata
        paths.append(tmp_path / f"m{i}.safetensors")
        mask.save(paths[-1])
    # safetensors writes its metadata map in hash order, so compare what the files hold
    first, second = WeightMask.load(paths[0]), WeightMask.load(paths[1])
    assert first.metadata == second.metadata
    assert all(torch.equal(first.packed(n), second.packed(n)) for n in params)
    randomized = mask_from_gradients(params, None, ratio=0.4, method="random", backend="torch")
    again = mask_from_gradients(
        params, None, ratio=0.4, method="random", seed=int(randomized.metadata["seed"]), backend="torch"
    )
    assert all(torch.equal(randomized.packed(n), again.packed(n)) for n in params)
