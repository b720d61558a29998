"""The unlearning loop, its data handling and checkpoints."""

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .loop import UnlearningDiverged, UnlearnResult, linear_schedule, unlearn

__all__ = [
    "UnlearnResult",
    "UnlearningDiverged",
    "latest_checkpoint",
    "linear_schedule",
    "load_checkpoint",
    "save_checkpoint",
    "unlearn",
]
