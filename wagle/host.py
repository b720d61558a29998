"""What a result was computed on: the numbers of a CPU run depend on the CPU's instruction set.

Floating-point sums are ordered by the kernels torch dispatches to, and on a CPU those are chosen by
the thread count and by the instruction set (``torch.backends.cpu.get_cpu_capability()``: AVX2,
AVX512, ...). Pinning the thread count makes a run repeatable on one machine; a machine with another
instruction set gives other (equally valid) low bits, which training then amplifies. Reports record
``host_description`` so that two results can be compared knowing whether they came from the same kind
of machine.
"""

from __future__ import annotations

import platform

import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_description(device: torch.device | str = "cpu") -> dict:
    """The device kind and name; on a CPU also its model and the instruction set torch dispatches to."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"device": "cuda", "name": torch.cuda.get_device_name(device)}
    if device.type != "cpu":
        return {"device": device.type}
    return {
        "device": "cpu",
        "cpu": _cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
    }
