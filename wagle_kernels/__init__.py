"""Triton kernels for WAGLE: fused scores, exact global top-k, bit-packed masks, masked optimizers.

Every kernel has a pure-torch reference path with the same semantics (used on CPU and in tests):

* :mod:`wagle_kernels.scores`  - per-weight scores (wagle, snip, gradient, magnitude, random) and keys;
* :mod:`wagle_kernels.select`  - exact top-k by radix select over score keys, bit-packed mask output;
* :mod:`wagle_kernels.bitpack` - the 1-bit-per-weight mask layout.
"""

from .bitpack import pack_bits, packed_size, popcount, unpack_bits
from .scores import METHODS, keys_torch, scores_torch
from .select import (
    ScoreSource,
    ScoreSpec,
    SelectionStats,
    Threshold,
    TorchSelector,
    TritonSelector,
    find_threshold,
)

__all__ = [
    "METHODS",
    "ScoreSource",
    "ScoreSpec",
    "SelectionStats",
    "Threshold",
    "TorchSelector",
    "TritonSelector",
    "find_threshold",
    "keys_torch",
    "pack_bits",
    "packed_size",
    "popcount",
    "scores_torch",
    "unpack_bits",
]
