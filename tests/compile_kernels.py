"""Compile every Triton kernel ahead of time for an NVIDIA target, without a GPU.

Run as a script (TRITON_INTERPRET must be unset so ``@triton.jit`` builds real kernels):

    python tests/compile_kernels.py [--arch 90]

Triton ships ptxas, so the kernels go through the whole pipeline (TTIR, TTGIR, LLVM IR, PTX, cubin)
for the target: this catches type errors and unsupported operations that the interpreter accepts.
It also checks that no score kernel contracts a multiply-add into an FMA (the scores must round
like the torch path), that every kernel streaming the weights/gradients/state loads them with 128-bit
or 64-bit vector loads (``ld.global.v4`` / ``ld.global.v2``) under the JIT's specialisation for 16-byte
aligned tensors whose sizes are multiples of 16, and (``ptxas -v``) that no streaming kernel spills
registers. It does not run them. Prints one line per kernel variant and exits 1 on the first failure.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import traceback

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from wagle_kernels import masked_adamw, masked_sgd, select  # noqa: E402
from wagle_kernels.multi_tensor import masked_multi_tensor_kernel  # noqa: E402
from wagle_kernels.scores import SCORE_METHODS  # noqa: E402

SCORE_KERNELS = (
    select._histogram_kernel,
    select._tie_count_kernel,
    select._mask_kernel,
    select._mask_compact_kernel,
)
STREAMING_KERNELS = (*SCORE_KERNELS, masked_multi_tensor_kernel)  # read every input element once
INPUT_FREE_METHODS = {m.kernel_id for m in SCORE_METHODS.values() if not any(m.reads)}  # load nothing


def ptxas_spills(ptx: str, arch: int) -> int:
    """Bytes of spill stores + loads ``ptxas -v`` reports for ``ptx`` (Triton's bundled ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas

    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as folder:
        src = os.path.join(folder, "kernel.ptx")
        with open(src, "w") as handle:
            handle.write(ptx)
        done = subprocess.run(
            [
                get_ptxas(arch).path,
                "-v",
                f"--gpu-name=sm_{arch}{suffix}",
                src,
                "-o",
                os.path.join(folder, "k.o"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    return sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", done.stderr))


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
        yield from module.compile_variants(2, "bf16", "fp32")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--max-shared", type=int, default=227 * 1024, help="shared memory per block limit")
    parser.add_argument(
        "--no-spills", dest="spills", action="store_false", help="skip the ptxas -v register-spill check"
    )
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
        ptx = compiled.asm["ptx"]
        if fn in SCORE_KERNELS and "fma." in ptx:
            print(f"FAILED {label}: the score was contracted into an FMA (masks would differ from torch)")
            return 1
        vector = ""
        if fn in STREAMING_KERNELS and constexprs.get("METHOD") not in INPUT_FREE_METHODS:
            widths = sorted(set(re.findall(r"ld\.global(?:\.[a-z]+)*\.(v[24])\.", ptx)))
            if not widths:
                print(
                    f"FAILED {label}: no 128/64-bit vector loads (ld.global.v4/v2) in the sm_{args.arch} PTX"
                )
                return 1
            vector = f", vector loads {'/'.join(widths)}"
            if args.spills and "x16" not in label:  # the 16-tensor variants repeat the 2-tensor code
                spilled = ptxas_spills(ptx, args.arch)
                if spilled:
                    print(f"FAILED {label}: ptxas reports {spilled} bytes of register spills")
                    return 1
                vector += ", no spills"
        shared = getattr(compiled.metadata, "shared", None)
        if shared is not None and shared > args.max_shared:
            print(f"FAILED {label}: needs {shared} bytes of shared memory (> {args.max_shared})")
            return 1
        size = len(compiled.asm["cubin"])
        print(f"ok {label}: {size} bytes of sm_{args.arch} cubin, shared memory {shared} B{vector}")
        checked += 1
    print(f"compiled {checked} kernel variants for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
