"""Sharded attribution and masks on ``torch.distributed``: exact selection over ranks, FSDP2 and DDP.

``select_segments`` ranks weights spread over ranks (FSDP2 shards, reduce-scattered DDP gradients,
ZeRO fragments) exactly as :func:`wagle.mask_from_gradients` ranks them on one device;
``ShardedMask`` holds one rank's bits and saves/loads them at any world size.
"""

from .comm import Collectives, CommStats
from .masks import MaskPart, ShardedMask, load_sharded
from .selection import Segment, ShardedSelectionStats, select_segments

__all__ = [
    "Collectives",
    "CommStats",
    "MaskPart",
    "Segment",
    "ShardedMask",
    "ShardedSelectionStats",
    "load_sharded",
    "select_segments",
]
