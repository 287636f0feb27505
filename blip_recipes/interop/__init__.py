"""Weight mapping between our model and the layouts users bring: reference BLIP `.pth`,
Hugging Face BLIP, BERT and DeiT/timm ViT initialisation checkpoints."""

from blip_recipes.interop.hf import (
    hf_blip_config,
    hf_text_model_to_med,
    hf_to_ours,
    hf_vision_model_to_vit,
    ours_to_hf_captioning,
    ours_to_hf_retrieval,
)
from blip_recipes.interop.init_checkpoints import (
    bert_init_state_dict,
    load_state_dict_file,
    vit_init_state_dict,
)
from blip_recipes.interop.reference import ReferenceWeights, ours_to_reference, reference_to_ours

__all__ = [
    "ReferenceWeights",
    "bert_init_state_dict",
    "hf_blip_config",
    "hf_text_model_to_med",
    "hf_to_ours",
    "hf_vision_model_to_vit",
    "load_state_dict_file",
    "ours_to_hf_captioning",
    "ours_to_hf_retrieval",
    "ours_to_reference",
    "reference_to_ours",
    "vit_init_state_dict",
]
