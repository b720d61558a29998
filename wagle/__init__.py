"""wagle: Triton-accelerated WAGLE weight attribution and masked unlearning for LLMs."""

from .attribution import attribute, mask_from_gradients
from .mask import MaskMismatchError, WeightMask

__version__ = "0.1.0"

__all__ = ["MaskMismatchError", "WeightMask", "__version__", "attribute", "mask_from_gradients"]
