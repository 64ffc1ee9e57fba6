"""adaln.train: EMA of weights and crash-safe, pickle-free checkpoints."""

from adaln.train.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    restore_rng,
    save_checkpoint,
)
from adaln.train.ema import EMA, canonical_state_dict, unwrap_model

__all__ = [
    "EMA",
    "CheckpointError",
    "canonical_state_dict",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest_checkpoint",
    "restore_rng",
    "save_checkpoint",
    "unwrap_model",
]
