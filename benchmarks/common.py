"""Shared benchmark helpers: model shapes, device/version facts, copy bandwidth, atomic JSON results."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from collections.abc import Callable

import torch


def llama_shapes(
    vocab: int = 32000, hidden: int = 4096, intermediate: int = 11008, layers: int = 32
) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a Llama-2 model in ``named_parameters()`` order (Llama-2-7B by default)."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[f"{p}mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


SHAPE_SETS: dict[str, Callable[[], dict[str, tuple[int, ...]]]] = {
    "llama2-7b": llama_shapes,
    # ~52M weights: the size at which the reference procedure was measured on a 2-core CPU
    "llama2-50m": lambda: llama_shapes(hidden=512, intermediate=1376, layers=6),
    "llama2-5m": lambda: llama_shapes(vocab=4096, hidden=256, intermediate=688, layers=4),
    # ~17K weights: smoke tests of the scripts themselves (tests/test_benchmarks.py)
    "llama2-tiny": lambda: llama_shapes(vocab=128, hidden=32, intermediate=48, layers=1),
}


def environment() -> dict:
    """Device name, versions and date for a results file."""
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            import subprocess

            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
        except OSError:
            info["driver"] = None
    else:
        info["device"] = "cpu"
    return info


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(
    fn: Callable[[], object], device: torch.device | str, repeats: int = 3, warmup: int = 1
) -> float:
    """Median wall time in seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Measured device copy bandwidth in bytes/s, counting bytes read + written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), device, repeats=repeats)
    return 2 * src.numel() * 4 / seconds


def write_json(path: str, payload: dict) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    from wagle.files import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def results_path(kind: str, info: dict) -> str:
    device = str(info.get("device", "cpu")).lower().replace(" ", "-").replace("/", "-")
    day = info["date"][:10]
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{kind}-{device}-{day}.json")
