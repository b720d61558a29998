"""Triton kernels for WAGLE: fused scores, exact global top-k, bit-packed masks, masked optimizers.

Every kernel has a pure-torch reference path with the same semantics (used on CPU and in tests):

* :mod:`wagle_kernels.scores`       - the score-method registry (wagle, snip, gradient, magnitude,
  random), per-weight scores and their order-preserving keys;
* :mod:`wagle_kernels.select`       - exact top-k by radix select over score keys, the ``Selector``
  protocol both backends implement, bit-packed mask output;
* :mod:`wagle_kernels.bitpack`      - the 1-bit-per-weight mask layout;
* :mod:`wagle_kernels.mask_bits`    - reading masks inside kernels, compact-state indices;
* :mod:`wagle_kernels.multi_tensor` - the masked multi-tensor launcher of the optimizer kernels;
* :mod:`wagle_kernels.masked_adamw`, :mod:`wagle_kernels.masked_sgd` - their update functions;
* :mod:`wagle_kernels._runtime`     - when kernels can run (CUDA, or the interpreter), launch options.
"""

from .bitpack import pack_bits, packed_size, popcount, unpack_bits
from .scores import (
    METHODS,
    SCORE_METHODS,
    ScoreMethod,
    keys_torch,
    method_names,
    register_method,
    scores_torch,
    unregister_method,
)
from .select import (
    ScoreSource,
    ScoreSpec,
    SelectionStats,
    Selector,
    Threshold,
    TorchSelector,
    TritonSelector,
    find_threshold,
    local_ties,
)

__all__ = [
    "METHODS",
    "SCORE_METHODS",
    "ScoreMethod",
    "ScoreSource",
    "ScoreSpec",
    "SelectionStats",
    "Selector",
    "Threshold",
    "TorchSelector",
    "TritonSelector",
    "find_threshold",
    "keys_torch",
    "local_ties",
    "method_names",
    "pack_bits",
    "packed_size",
    "popcount",
    "register_method",
    "scores_torch",
    "unpack_bits",
    "unregister_method",
]
