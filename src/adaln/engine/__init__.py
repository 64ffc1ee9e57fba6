"""adaln.engine: the one training loop and what it owns.

``fit`` (loop.py) trains any task; ``RunConfig`` + ``option`` (config.py) are the schema every task's
config extends; the run directory (rundir.py: lock, config.json, metrics), checkpoints (checkpoint.py:
atomic safetensors + JSON, never pickle), EMA (ema.py), seeding (seeding.py: one scheme) and
DDP/FSDP2 (distributed.py).
"""

from adaln.engine.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    restore_rng,
    save_checkpoint,
)
from adaln.engine.config import RunConfig, option
from adaln.engine.ema import EMA, canonical_state_dict, unwrap_model
from adaln.engine.loop import FitResult, fit, learning_rate, resolve_device

__all__ = [
    "EMA",
    "CheckpointError",
    "FitResult",
    "RunConfig",
    "canonical_state_dict",
    "fit",
    "learning_rate",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest_checkpoint",
    "option",
    "resolve_device",
    "restore_rng",
    "save_checkpoint",
    "unwrap_model",
]
