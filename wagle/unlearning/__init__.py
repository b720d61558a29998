"""The unlearning loop, its data handling, verified checkpoints and run fingerprints."""

from .checkpoint import CheckpointError, find_checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from .fingerprint import ResumeMismatchError
from .loop import UnlearningDiverged, UnlearnResult, linear_schedule, micro_batch_seed, unlearn

__all__ = [
    "CheckpointError",
    "ResumeMismatchError",
    "UnlearnResult",
    "UnlearningDiverged",
    "find_checkpoint",
    "latest_checkpoint",
    "linear_schedule",
    "load_checkpoint",
    "micro_batch_seed",
    "save_checkpoint",
    "unlearn",
]
