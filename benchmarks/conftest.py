"""pytest-benchmark suite configuration: compiled kernels on a GPU, the Triton interpreter on a CPU.

    pytest benchmarks --benchmark-only                              # tiny shapes (CPU) / layer shapes (GPU)
    pytest benchmarks --benchmark-only --benchmark-autosave         # saved under .benchmarks/ ...
    pytest benchmarks --benchmark-only --benchmark-compare          # ... and diffed against the last save
    WAGLE_BENCH_SHAPES=llama2-7b pytest benchmarks --benchmark-only # the whole model (GPU)

TRITON_INTERPRET must be set before triton is imported, hence here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
