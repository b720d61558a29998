"""Where a mask selects: density per decoder layer and module, as a table and a heatmap PNG.

WAGLE's selection is far from uniform across layers and modules (the paper's layer-wise analysis);
this view makes that visible for any mask: ``density = selected / numel`` of each (layer, module) cell,
plus one value per parameter outside the decoder layers (embeddings, final norm, lm_head).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from wagle.errors import UserError
from wagle.files import atomic_write
from wagle.mask import WeightMask

# "model.layers.3.mlp.up_proj.weight" -> layer 3, module "mlp.up_proj.weight" (Llama, Mistral, Qwen,
# GPT-2 "h.3.", GPT-NeoX "layers.3.", BERT-like "layer.3.", "blocks.3.")
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.(.+)$")


@dataclass
class LayerDensities:
    """``density[i, j]`` of module ``modules[i]`` in layer ``layers[j]`` (NaN where a layer lacks the
    module); ``other``: density of each parameter outside the decoder layers."""

    layers: list[int]
    modules: list[str]
    density: np.ndarray
    other: dict[str, float]


def layer_densities(mask: WeightMask) -> LayerDensities:
    """Group the mask's parameters by decoder layer index and module name (see the module docstring)."""
    cells: dict[tuple[str, int], list[int]] = {}
    other: dict[str, float] = {}
    modules: list[str] = []
    for name in mask:
        numel = int(np.prod(mask.shape(name), dtype=np.int64))
        found = _LAYER.search(name)
        if found is None:
            other[name] = mask.selected(name) / numel if numel else float("nan")
            continue
        layer, module = int(found.group(1)), found.group(2)
        if module not in modules:
            modules.append(module)
        cell = cells.setdefault((module, layer), [0, 0])
        cell[0] += mask.selected(name)
        cell[1] += numel
    layers = sorted({layer for _, layer in cells})
    density = np.full((len(modules), len(layers)), np.nan)
    for (module, layer), (selected, numel) in cells.items():
        if numel:
            density[modules.index(module), layers.index(layer)] = selected / numel
    return LayerDensities(layers, modules, density, other)


def plot_mask_densities(mask: WeightMask, path: str | os.PathLike, *, title: str | None = None) -> None:
    """PNG heatmap of the mask's density per (module, decoder layer), with a bar per parameter outside
    the layers; written atomically. Uses the Agg canvas directly (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = layer_densities(mask)
    if not data.layers and not data.other:
        raise UserError("mask: no parameters to plot")
    height = max(3.0, 0.35 * len(data.modules) + 1.8)
    width = min(16.0, max(6.4, 0.28 * len(data.layers) + 5.0))
    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, 2, width_ratios=[max(len(data.layers), 6), 3])
    if data.layers:
        ax = fig.add_subplot(grid[0, 0])
        image = ax.imshow(data.density, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_yticks(range(len(data.modules)), data.modules, fontsize=7)
        step = max(1, len(data.layers) // 16)
        ax.set_xticks(range(0, len(data.layers), step), [str(v) for v in data.layers[::step]], fontsize=7)
        ax.set_xlabel("decoder layer")
        fig.colorbar(image, ax=ax, label="selected fraction", fraction=0.04)
    if data.other:
        ax = fig.add_subplot(grid[0, 1])
        names = list(data.other)
        bars = ax.barh(range(len(names)), [data.other[n] for n in names], color="tab:orange")
        ax.bar_label(bars, labels=[f"{data.other[n]:.0%}" for n in names], fontsize=7, padding=2)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlim(0.0, 1.25)
        ax.set_xticks([0.0, 0.5, 1.0], ["0", "0.5", "1"], fontsize=7)
        ax.invert_yaxis()
        ax.set_title("outside the layers", fontsize=8)
    fig.suptitle(title or f"mask density (overall {mask.density:.1%} of {mask.numel:,} weights)", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
