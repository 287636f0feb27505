"""Distributed set-up and the in-place model transforms the recipe applies, in this order:
float8 -> activation checkpointing -> compile -> FSDP (TorchTitan's order)."""

from blip_recipes.parallel.activation_checkpointing import apply_activation_checkpointing
from blip_recipes.parallel.compile import apply_compile
from blip_recipes.parallel.data_parallel import all_reduce_gradients
from blip_recipes.parallel.distributed import (
    DP_SHARD,
    DistInfo,
    init_distributed,
    resolve_device_type,
    shutdown_distributed,
)
from blip_recipes.parallel.float8 import apply_float8, float8_eligible, float8_precompute_scales
from blip_recipes.parallel.fsdp import apply_fsdp, reshard_all

__all__ = [
    "DP_SHARD",
    "DistInfo",
    "all_reduce_gradients",
    "apply_activation_checkpointing",
    "apply_compile",
    "apply_float8",
    "apply_fsdp",
    "reshard_all",
    "float8_eligible",
    "float8_precompute_scales",
    "init_distributed",
    "resolve_device_type",
    "shutdown_distributed",
]
