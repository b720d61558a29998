"""Mask density per decoder layer and module (wagle.layer_densities) and its PNG heatmap."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import random_llama

from wagle import WeightMask, layer_densities, plot_mask_densities


def test_densities_by_layer_and_module_by_hand():
    model = random_llama(vocab_size=64)  # 2 layers
    g = torch.Generator().manual_seed(0)
    bools = {
        n: torch.rand(p.shape, generator=g) < (0.1 + 0.02 * i)
        for i, (n, p) in enumerate(model.named_parameters())
    }
    data = layer_densities(WeightMask.from_dict(bools))
    assert data.layers == [0, 1]
    assert "self_attn.q_proj.weight" in data.modules and "mlp.down_proj.weight" in data.modules
    for name, chosen in bools.items():
        if ".layers." in name:
            layer = int(name.split(".layers.")[1].split(".")[0])
            module = name.split(f".layers.{layer}.")[1]
            got = data.density[data.modules.index(module), data.layers.index(layer)]
            assert got == pytest.approx(chosen.float().mean().item())
        else:
            assert data.other[name] == pytest.approx(chosen.float().mean().item())
    assert set(data.other) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert not np.isnan(data.density).any()


def test_layers_without_a_module_are_nan_and_other_naming_schemes():
    mask = WeightMask.from_dict(
        {
            "transformer.h.0.attn.weight": torch.tensor([True, False]),
            "transformer.h.1.mlp.weight": torch.tensor([True, True, True, False]),
            "wte.weight": torch.tensor([False, False, True]),
        }
    )
    data = layer_densities(mask)
    assert data.layers == [0, 1] and data.modules == ["attn.weight", "mlp.weight"]
    assert data.density[0, 0] == 0.5 and math.isnan(data.density[0, 1]) and data.density[1, 1] == 0.75
    assert data.other == {"wte.weight": pytest.approx(1 / 3)}


def test_plot_is_a_png_written_atomically(tmp_path):
    model = random_llama(vocab_size=64)
    mask = WeightMask.from_dict({n: torch.rand(p.shape) < 0.3 for n, p in model.named_parameters()})
    plot_mask_densities(mask, tmp_path / "sub" / "d.png", title="test")
    assert (tmp_path / "sub" / "d.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["d.png"]
    with pytest.raises(ValueError, match="no parameters"):
        plot_mask_densities(WeightMask.from_dict({}), tmp_path / "e.png")
