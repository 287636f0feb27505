"""BLIP model components and builders.

Component builders take every hyperparameter (`vit`, `med`); model builders are named presets
(`blip_pretrain_tiny`, `blip_pretrain_base`, `blip_pretrain_large`) with keyword overrides;
`build_model(name, **overrides)` / `build_momentum_encoders(name, **overrides)` look them up by name.
"""

from blip_recipes.models.bert_blocks import LMHead
from blip_recipes.models.blip import BlipOutput, BlipPretrain, MomentumTargets
from blip_recipes.models.builders import (
    MODEL_BUILDERS,
    blip_pretrain_base,
    blip_pretrain_large,
    blip_pretrain_tiny,
    build_model,
    build_momentum_encoders,
    med,
    preset_queue_size,
    vit,
)
from blip_recipes.models.med import MED, MEDLayer, MEDOutput
from blip_recipes.models.momentum_encoders import MomentumEncoders
from blip_recipes.models.vit import VisionBlock, VisionTransformer, interpolate_pos_embed

__all__ = [
    "MED",
    "MODEL_BUILDERS",
    "BlipOutput",
    "BlipPretrain",
    "LMHead",
    "MEDLayer",
    "MEDOutput",
    "MomentumEncoders",
    "MomentumTargets",
    "VisionBlock",
    "VisionTransformer",
    "blip_pretrain_base",
    "blip_pretrain_large",
    "blip_pretrain_tiny",
    "build_model",
    "build_momentum_encoders",
    "interpolate_pos_embed",
    "med",
    "preset_queue_size",
    "vit",
]
