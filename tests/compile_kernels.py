"""Compile every Triton kernel ahead of time for an NVIDIA target, without a GPU.

Run as a script (TRITON_INTERPRET must be unset so ``@triton.jit`` builds real kernels):

    python tests/compile_kernels.py [--arch 90]

Triton ships ptxas, so the kernels go through the whole pipeline (TTIR, TTGIR, LLVM IR, PTX, cubin)
for the target: this catches type errors and unsupported operations that the interpreter accepts.
It also checks that no score kernel contracts a multiply-add into an FMA (the scores must round
like the torch path). It does not run them. Prints one line per kernel variant and exits 1 on the
first failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from wagle_kernels import masked_adamw, masked_sgd, select  # noqa: E402

SCORE_KERNELS = (
    select._histogram_kernel,
    select._tie_count_kernel,
    select._mask_kernel,
    select._mask_compact_kernel,
)


def variants():
    """``(label, jit function, signature, constexprs, attrs)`` from the signature source next to each
    kernel: selection kernels (every registered score method), then the optimizers for bf16 and fp32
    parameters with fp32 state, 16 tensors per launch, and with the 64-bit numels the JIT uses for tensors
    of 2^31 or more weights."""
    yield from select.compile_variants()
    for module in (masked_adamw, masked_sgd):
        for dtype in ("bf16", "fp32"):
            yield from module.compile_variants(16, dtype, "fp32")
        yield from module.compile_variants(2, "bf16", "fp32", index="i64")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--max-shared", type=int, default=227 * 1024, help="shared memory per block limit")
    args = parser.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    checked = 0
    for label, fn, signature, constexprs, attrs in variants():
        fn = getattr(fn, "fn", fn) if not isinstance(fn, triton.runtime.JITFunction) else fn
        try:
            source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(
                source, target=target, options={"num_warps": 8, "enable_fp_fusion": False}
            )
        except Exception:
            print(f"FAILED {label}")
            traceback.print_exc()
            return 1
        if fn in SCORE_KERNELS and "fma." in compiled.asm["ptx"]:
            print(f"FAILED {label}: the score was contracted into an FMA (masks would differ from torch)")
            return 1
        shared = getattr(compiled.metadata, "shared", None)
        if shared is not None and shared > args.max_shared:
            print(f"FAILED {label}: needs {shared} bytes of shared memory (> {args.max_shared})")
            return 1
        size = len(compiled.asm["cubin"])
        print(f"ok {label}: {size} bytes of sm_{args.arch} cubin, shared memory {shared} B")
        checked += 1
    print(f"compiled {checked} kernel variants for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
