"""Triton kernels for WAGLE: fused scores, exact global top-k, bit-packed masks, masked optimizers.

Every kernel has a pure-torch reference path with the same semantics (used on CPU and in tests).
"""
