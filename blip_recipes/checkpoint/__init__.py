"""Checkpoints with torch.distributed.checkpoint: a manager that knows no model, and the
Stateful wrappers of what a training checkpoint holds, and their integrity checks (checksum
manifest, verification, the finite-weights guard)."""

from blip_recipes.checkpoint.integrity import (
    MANIFEST_FILE,
    METADATA_FILE,
    CheckpointCorruptError,
    CheckpointReport,
    checksum_file,
    read_manifest,
    step_folders,
    verify_checkpoint,
    write_checksums,
)
from blip_recipes.checkpoint.loading import (
    CheckpointMismatchError,
    check_against_metadata,
    is_complete,
    load_model_weights,
    load_states,
    top_level_keys,
)
from blip_recipes.checkpoint.manager import CheckpointManager
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
from blip_recipes.checkpoint.write_errors import CheckpointWriteError, NonFiniteCheckpointError

__all__ = [
    "LOADER",
    "LR_SCHEDULER",
    "MANIFEST_FILE",
    "METADATA_FILE",
    "MODEL",
    "MOMENTUM",
    "OPTIMIZER",
    "TRAIN_STATE",
    "CheckpointCorruptError",
    "CheckpointManager",
    "CheckpointMismatchError",
    "CheckpointReport",
    "CheckpointWriteError",
    "NonFiniteCheckpointError",
    "ModelWrapper",
    "OptimizerWrapper",
    "PerRankState",
    "TrainState",
    "capture_rng_state",
    "check_against_metadata",
    "checksum_file",
    "is_complete",
    "load_model_weights",
    "load_states",
    "rank_key",
    "read_manifest",
    "restore_rng_state",
    "step_folders",
    "top_level_keys",
    "verify_checkpoint",
    "write_checksums",
]
