"""Checkpoints with torch.distributed.checkpoint: a manager that knows no model, and the
Stateful wrappers of what a training checkpoint holds."""

from blip_recipes.checkpoint.manager import (
    METADATA_FILE,
    CheckpointManager,
    CheckpointMismatchError,
    check_against_metadata,
    is_complete,
    load_model_weights,
    load_states,
    top_level_keys,
)
from blip_recipes.checkpoint.states import (
    LOADER,
    LR_SCHEDULER,
    MODEL,
    MOMENTUM,
    OPTIMIZER,
    TRAIN_STATE,
    ModelWrapper,
    OptimizerWrapper,
    PerRankState,
    TrainState,
    capture_rng_state,
    rank_key,
    restore_rng_state,
)

__all__ = [
    "LOADER",
    "LR_SCHEDULER",
    "METADATA_FILE",
    "MODEL",
    "MOMENTUM",
    "OPTIMIZER",
    "TRAIN_STATE",
    "CheckpointManager",
    "CheckpointMismatchError",
    "ModelWrapper",
    "OptimizerWrapper",
    "PerRankState",
    "TrainState",
    "capture_rng_state",
    "check_against_metadata",
    "is_complete",
    "load_model_weights",
    "load_states",
    "rank_key",
    "restore_rng_state",
    "top_level_keys",
]
