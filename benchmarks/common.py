"""Shared benchmark helpers: model shapes, device/version/commit facts, timing statistics, copy
bandwidth, JSON results that never overwrite each other.

Timing convention (every benchmark): each timed quantity is recorded as both the minimum and the
median over its repeats (:func:`time_stats`); the derived figures (``x_floor``, GB/s, % of copy) and
the printed tables use the **minimum**, the least disturbed run on a shared machine.
"""

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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit(root: str = ROOT) -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the source tree the benchmark ran from."""
    import subprocess

    try:
        sha = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": sha or None, "dirty": bool(status.strip())}


def package_version() -> str | None:
    """The version of the ``wagle`` package the benchmark imported."""
    try:
        import wagle
    except ImportError:
        return None
    return getattr(wagle, "__version__", None)


def environment() -> dict:
    """Device name, versions, source commit and date for a results file."""
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "wagle": package_version(),
        **{f"git_{key}": value for key, value in git_commit().items()},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    from wagle.host import host_description

    cpu = host_description("cpu")
    info["cpu_model"], info["cpu_capability"] = cpu["cpu"], cpu["capability"]
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


def time_stats(times: list[float]) -> dict:
    """``{"min", "median", "all"}`` of wall times in seconds (the convention of every benchmark)."""
    ordered = sorted(times)
    if not ordered:
        raise ValueError("times: no timed runs")
    return {"min": ordered[0], "median": ordered[len(ordered) // 2], "all": ordered}


def time_call(
    fn: Callable[[], object], device: torch.device | str, repeats: int = 3, warmup: int = 1
) -> dict:
    """:func:`time_stats` of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return time_stats(times)


def copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Measured device copy bandwidth in bytes/s, counting bytes read + written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), device, repeats=repeats)["min"]
    return 2 * src.numel() * 4 / seconds


def write_json(path: str, payload: dict) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    from wagle.files import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def results_path(kind: str, info: dict, folder: str | None = None) -> str:
    """``results/<kind>-<device>-<UTC timestamp>[-<n>].json``: a new file per run (a second run in the
    same second gets a numeric suffix), so no run overwrites another."""
    device = str(info.get("device", "cpu")).lower().replace(" ", "-").replace("/", "-")
    stamp = info["date"][:19].replace("-", "").replace(":", "")  # 20261201T213542
    folder = folder or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    path = os.path.join(folder, f"{kind}-{device}-{stamp}Z.json")
    suffix = 1
    while os.path.exists(path):
        suffix += 1
        path = os.path.join(folder, f"{kind}-{device}-{stamp}Z-{suffix}.json")
    return path
