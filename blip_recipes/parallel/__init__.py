"""Distributed set-up and the in-place model transforms, in TorchTitan's order:
float8 -> activation checkpointing -> compile -> FSDP. `parallelize_blip` applies the whole plan."""

from blip_recipes.parallel.activation_checkpointing import apply_activation_checkpointing
from blip_recipes.parallel.compile import apply_compile
from blip_recipes.parallel.distributed import (
    DP,
    DP_REPLICATE,
    DP_SHARD,
    DataParallel,
    DistInfo,
    build_data_parallel_mesh,
    init_distributed,
    resolve_device_type,
    shutdown_distributed,
)
from blip_recipes.parallel.float8 import (
    FLOAT8_FILTER_DEFAULT,
    FLOAT8_SKIP_FQNS,
    apply_float8,
    float8_eligible,
    float8_module_filter,
    float8_precompute_scales,
    float8_skip_reason,
)
from blip_recipes.parallel.fsdp import ReduceOnce, apply_fsdp, reshard_all
from blip_recipes.parallel.parallelize import (
    ParallelPlan,
    materialize,
    parallelize_blip,
    reused_units,
    transformer_blocks,
)

__all__ = [
    "DP",
    "DP_REPLICATE",
    "DP_SHARD",
    "DataParallel",
    "DistInfo",
    "FLOAT8_FILTER_DEFAULT",
    "FLOAT8_SKIP_FQNS",
    "ParallelPlan",
    "ReduceOnce",
    "apply_activation_checkpointing",
    "apply_compile",
    "apply_float8",
    "apply_fsdp",
    "build_data_parallel_mesh",
    "float8_eligible",
    "float8_module_filter",
    "float8_skip_reason",
    "float8_precompute_scales",
    "init_distributed",
    "materialize",
    "parallelize_blip",
    "reshard_all",
    "reused_units",
    "resolve_device_type",
    "shutdown_distributed",
    "transformer_blocks",
]
