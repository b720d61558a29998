"""wagle: Triton-accelerated WAGLE weight attribution and masked unlearning for LLMs."""

from .attribution import mask_from_gradients
from .mask import MaskMismatchError, WeightMask

__version__ = "0.1.0"

__all__ = ["MaskMismatchError", "WeightMask", "mask_from_gradients", "__version__"]
