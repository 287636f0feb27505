"""Typed run configuration: TOML sections as dataclasses, overrides, validation."""

from blip_recipes.config._schema import ConfigError, field_docs
from blip_recipes.config.checks import LaunchContext, register_advice, register_validator
from blip_recipes.config.loader import (
    all_keys,
    apply_override,
    exit_on_config_error,
    help_text,
    load_config,
    load_toml,
    split_overrides,
    to_toml,
)
from blip_recipes.config.sections import (
    CheckpointConfig,
    Config,
    DataConfig,
    DataSourceConfig,
    EvalConfig,
    JobConfig,
    LRSchedulerConfig,
    MetricsConfig,
    ModelConfig,
    MomentumConfig,
    OptimizerConfig,
    ParallelConfig,
    TokenizerConfig,
    TrainingConfig,
)
from blip_recipes.config.validation import validate

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DataSourceConfig",
    "EvalConfig",
    "JobConfig",
    "LRSchedulerConfig",
    "LaunchContext",
    "MetricsConfig",
    "ModelConfig",
    "MomentumConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "TokenizerConfig",
    "TrainingConfig",
    "all_keys",
    "apply_override",
    "exit_on_config_error",
    "field_docs",
    "help_text",
    "load_config",
    "load_toml",
    "register_advice",
    "register_validator",
    "split_overrides",
    "to_toml",
    "validate",
]

from blip_recipes.config.recipe_args import parse_recipe_args, split_config_arg  # noqa: E402

__all__ += ["parse_recipe_args", "split_config_arg"]
