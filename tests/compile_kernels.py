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
    """(label, jit function, {arg: type or 'constexpr'}, {constexpr: value})"""
    inputs = {"w_ptr": "*bf16", "gf_ptr": "*bf16", "gr_ptr": "*fp32"}
    scalars = {"n": "i64", "start": "i64", "inv_gamma": "fp32", "seed": "i32"}
    histogram_signature = {
        **inputs,
        "hist_ptr": "*i64",
        "nonfinite_ptr": "*i64",
        **scalars,
        "prefix": "i32",
        "programs": "i32",
        "iterations": "i32",
        "PREFIX_SHIFT": "constexpr",
        "DIGIT_SHIFT": "constexpr",
        "DIGIT_BITS": "constexpr",
        "METHOD": "constexpr",
        "COUNT_NONFINITE": "constexpr",
        "BLOCK": "constexpr",
    }
    first_digit = {"PREFIX_SHIFT": 31, "DIGIT_SHIFT": 20, "DIGIT_BITS": 11, "COUNT_NONFINITE": True}
    last_digit = {"PREFIX_SHIFT": 10, "DIGIT_SHIFT": 0, "DIGIT_BITS": 10, "COUNT_NONFINITE": False}
    histograms = [(f"histogram method={m}", {**first_digit, "METHOD": m}) for m in range(5)]
    histograms.append(("histogram digit 2", {**last_digit, "METHOD": 0}))
    for label, constexprs in histograms:
        yield label, select._histogram_kernel, histogram_signature, {**constexprs, "BLOCK": 4096}
    yield (
        "tie count",
        select._tie_count_kernel,
        {
            **inputs,
            "counts_ptr": "*i64",
            **scalars,
            "threshold": "i32",
            "METHOD": "constexpr",
            "BLOCK": "constexpr",
        },
        {"METHOD": 0, "BLOCK": 4096},
    )
    for has_ties in (False, True):
        yield (
            f"mask ties={has_ties}",
            select._mask_kernel,
            {
                **inputs,
                "out_ptr": "*u8",
                "tie_offset_ptr": "*i64",
                **scalars,
                "threshold": "i32",
                "ties": "i64",
                "METHOD": "constexpr",
                "HAS_TIES": "constexpr",
                "BLOCK": "constexpr",
            },
            {"METHOD": 0, "HAS_TIES": has_ties, "BLOCK": 4096},
        )
    yield (
        "mask + candidates",
        select._mask_compact_kernel,
        {
            **inputs,
            "out_ptr": "*u8",
            "cand_key_ptr": "*i32",
            "cand_pos_ptr": "*i64",
            "counter_ptr": "*i64",
            **scalars,
            "low": "i32",
            "high": "i32",
            "capacity": "i64",
            "METHOD": "constexpr",
            "BLOCK": "constexpr",
        },
        {"METHOD": 0, "BLOCK": 4096},
    )
    yield (
        "set bits",
        select._set_bits_kernel,
        {"words_ptr": "*i32", "bit_ptr": "*i64", "m": "i64", "BLOCK": "constexpr"},
        {"BLOCK": 4096},
    )
    for module in (masked_adamw, masked_sgd):
        for dtypes in (("bf16", "fp32"), ("fp32", "fp32")):
            for label, fn, signature, constexprs in module.compile_variants(16, *dtypes):
                yield label, fn, signature, constexprs, masked_adamw.aligned_attrs(signature)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--max-shared", type=int, default=227 * 1024, help="shared memory per block limit")
    args = parser.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    for label, fn, signature, constexprs, *attrs in variants():
        fn = getattr(fn, "fn", fn) if not isinstance(fn, triton.runtime.JITFunction) else fn
        try:
            source = ASTSource(
                fn=fn, signature=signature, constexprs=constexprs, attrs=attrs[0] if attrs else None
            )
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
