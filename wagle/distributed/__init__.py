"""Sharded attribution and masks on ``torch.distributed``: exact selection over ranks, FSDP2 and DDP.

``select_segments`` ranks weights spread over ranks (FSDP2 shards, reduce-scattered DDP gradients,
ZeRO fragments) exactly as :func:`wagle.mask_from_gradients` ranks them on one device;
``ShardedMask`` holds one rank's bits and saves/loads them at any world size; the masked optimizers
step DTensor parameters on their shards (``clip_grad_norm_`` clips them exactly as one device does,
``optimizer_state_dict`` saves their state with torch.distributed.checkpoint).
"""

from .attribution import summed_fsdp_gradients
from .clipping import clip_grad_norm_
from .comm import Collectives, CommStats
from .masks import MaskPart, ShardedMask, load_sharded
from .optim import load_optimizer_state_dict, optimizer_state_dict
from .selection import Segment, ShardedSelectionStats, select_segments

__all__ = [
    "Collectives",
    "CommStats",
    "MaskPart",
    "Segment",
    "ShardedMask",
    "ShardedSelectionStats",
    "clip_grad_norm_",
    "load_optimizer_state_dict",
    "load_sharded",
    "optimizer_state_dict",
    "select_segments",
    "summed_fsdp_gradients",
]
