"""Weight attribution: scores per weight and the masks of the top-scoring weights."""

from .from_gradients import mask_from_gradients, num_to_select
from .from_model import accumulate_gradients, attribute, select_parameters
from .wanda import wanda_mask

__all__ = [
    "accumulate_gradients",
    "attribute",
    "mask_from_gradients",
    "num_to_select",
    "select_parameters",
    "wanda_mask",
]
