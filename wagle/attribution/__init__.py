"""Weight attribution: scores per weight and the masks of the top-scoring weights."""

from .from_gradients import mask_from_gradients

__all__ = ["mask_from_gradients"]
