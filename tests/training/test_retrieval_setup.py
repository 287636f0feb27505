"""Set-up pieces of retrieval fine-tuning: weights at another resolution, the frozen decoder,
the per-epoch cosine, the best-result state and the [retrieval] checks."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from blip_recipes.config import Config, ConfigError, validate
from blip_recipes.models.vit import interpolate_pos_embed
from blip_recipes.training.retrieval_setup import fit_state_dict, freeze_decoder
from tests.models.tiny_blip import make_model


def test_fit_state_dict_interpolates_the_position_embedding():
    source = make_model(image_size=32).state_dict()  # 2 x 2 patches
    target = make_model(seed=1, image_size=64).state_dict()  # 4 x 4 patches
    source["temp"] = torch.tensor(0.05)  # 0-d, as in reference checkpoints
    del source["itm_head.bias"]
    fitted = fit_state_dict(source, target, "test")
    pos = fitted["visual_encoder.pos_embed"]
    assert pos.shape == target["visual_encoder.pos_embed"].shape == (1, 17, 48)
    assert torch.equal(pos, interpolate_pos_embed(source["visual_encoder.pos_embed"], 16))
    assert fitted["temp"].shape == (1,) and fitted["temp"].item() == pytest.approx(0.05)
    assert torch.equal(fitted["itm_head.bias"], target["itm_head.bias"])  # missing: kept
    assert torch.equal(fitted["itm_head.weight"], source["itm_head.weight"])


def test_fit_state_dict_names_what_does_not_fit():
    target = make_model().state_dict()
    with pytest.raises(ValueError, match="no place for: \\['extra.weight'\\]"):
        fit_state_dict({"extra.weight": torch.zeros(1)}, target, "ckpt")
    with pytest.raises(ValueError, match="vision_proj.weight"):
        fit_state_dict({"vision_proj.weight": torch.zeros(3, 3)}, target, "ckpt")


def test_freeze_decoder_leaves_the_retrieval_parameters_trainable():
    model = make_model()
    frozen = freeze_decoder(model)
    assert frozen and all("causal_self_attn." in n or n.startswith("lm_head.") for n in frozen)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "text.embeddings.word_embeddings.weight" in trainable  # shared with the encoder
    assert "text.layers.0.cross_attn.query.weight" in trainable and "temp" in trainable


def test_retrieval_section_checks(tmp_path):
    cfg = Config()
    cfg.retrieval = replace(cfg.retrieval, eval_every_epochs=0,
                            test_annotation=str(tmp_path / "missing.json"))  # fmt: skip
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    message = str(error.value)
    assert "'retrieval.eval_every_epochs' must be >= 1, got 0" in message
    assert "missing.json does not exist" in message
    assert "'eval.annotation'" in message


@pytest.mark.parametrize(
    "name, k_test, all_ranks",
    [("finetune_retrieval_coco", 256, True), ("finetune_retrieval_flickr", 128, False)],
)
def test_configs_hold_the_published_settings(name, k_test, all_ranks):
    from blip_recipes.config import load_config
    from blip_recipes.config.registry import resolve_config

    cfg = load_config(resolve_config(name), [])
    assert (cfg.model.image_size, cfg.momentum.queue_size, cfg.momentum.decay) == (
        384,
        57600,
        0.995,
    )
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.lr_scheduler.min_lr) == (
        1e-5,
        0.05,
        0,
    )
    assert (cfg.training.epochs, cfg.momentum.alpha, cfg.momentum.alpha_ramp_epochs) == (6, 0.4, 1)
    assert (cfg.data.batch_size, cfg.tokenizer.max_length, cfg.data.min_scale) == (32, 35, 0.5)
    assert (cfg.parallel.activation_checkpointing, cfg.parallel.ac_vit_layers) == ("vit_last_n", 4)
    assert (cfg.eval.k_test, cfg.retrieval.negatives_all_ranks) == (k_test, all_ranks)
    assert cfg.momentum.queue_size % (cfg.data.batch_size * 8) == 0
