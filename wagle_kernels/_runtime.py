"""When Triton kernels can run, and on what.

Triton kernels run compiled on CUDA tensors, or on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``, which must be set before ``triton`` is first imported). Everything else uses
the pure-torch reference paths.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

try:  # triton is an optional import: CPU-only installs on non-Linux platforms lack it
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is not installed
    HAS_TRITON = False


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its numpy interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_supports(tensors: Iterable[torch.Tensor]) -> bool:
    """True when a Triton kernel can run on all ``tensors`` (CUDA, or CPU under the interpreter)."""
    if not HAS_TRITON:
        return False
    devices = {t.device.type for t in tensors}
    if devices <= {"cuda"}:
        return True
    return devices <= {"cpu"} and interpreter_enabled()


def require_triton(tensors: Iterable[torch.Tensor], what: str) -> None:
    """Raise a clear error when ``what`` was asked to run Triton kernels on tensors that cannot."""
    tensors = list(tensors)
    if not HAS_TRITON:
        raise RuntimeError(f"{what}: triton is not installed; use the torch backend")
    if not triton_supports(tensors):
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f"{what}: Triton kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
            f"triton is imported; got tensors on {devices}"
        )


def launch_options() -> dict:
    """Keyword options for every kernel launch.

    ``enable_fp_fusion=False`` stops the compiler from contracting ``a*b+c`` into an FMA, so kernels
    round every operation exactly like the torch reference path (bit-identical scores and masks).
    """
    return {"enable_fp_fusion": False}


def aligned_attrs(
    signature: dict, divisible: tuple[str, ...] = (), tuples: tuple[str, ...] | None = None
) -> dict:
    """Specialization attributes of a launch whose pointers are 16-byte aligned and whose integers inside
    tuples (the numels; only the tuples named in ``tuples`` when given) and the scalars named in
    ``divisible`` are multiples of 16, what the JIT derives at run time for such tensors:
    ``{(arg,) or (arg, element): [["tt.divisibility", 16]]}`` for ``ASTSource(..., attrs=...)``."""
    attrs = {}
    for index, (name, kind) in enumerate(signature.items()):
        if isinstance(kind, tuple):
            for element, ty in enumerate(kind):
                integer = ty in ("i32", "i64") and (tuples is None or name in tuples)
                if ty.startswith("*") or integer:
                    attrs[(index, element)] = [["tt.divisibility", 16]]
        elif kind.startswith("*") or name in divisible:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return attrs
