"""checkpoint.init_from is compared with the config's model and tokenizer before launch."""

from __future__ import annotations

from pathlib import Path

from blip_recipes.config import LaunchContext, load_config, to_toml
from blip_recipes.interop.checkpoint_match import _init_from_matches

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"


def _run_folder(tmp_path: Path) -> Path:
    """A tiny pretraining run's folder: its config.toml and one (empty) step-4 checkpoint."""
    run = tmp_path / "pre"
    step = run / "checkpoints" / "step-4"
    step.mkdir(parents=True)
    (step / ".metadata").write_bytes(b"")
    (run / "config.toml").write_text(to_toml(load_config(CONFIGS / "debug.toml")))
    return step


def test_base_config_over_a_tiny_checkpoint_names_each_mismatch_and_its_override(tmp_path):
    step = _run_folder(tmp_path)
    cfg = load_config(CONFIGS / "finetune_caption_coco.toml", [f"checkpoint.init_from={step}"])
    lines = list(_init_from_matches(cfg, LaunchContext()))
    where = f"checkpoint.init_from {step}"
    assert lines == [
        f"'model.name' is blip_pretrain_base but {where} holds a blip_pretrain_tiny model: set "
        "model.name=blip_pretrain_tiny to start from it",
        f"'model.embed_dim' is 256 but {where} has embed_dim 64: set model.embed_dim=64 to start "
        "from it",
        f"'tokenizer' is wordpiece pretrained/bert-base-uncased but {where} was trained with "
        "synthetic: set tokenizer.kind=synthetic to start from it",
    ]


def test_matching_config_passes_and_the_resolution_may_differ(tmp_path):
    step = _run_folder(tmp_path)
    cfg = load_config(CONFIGS / "debug.toml", [f"checkpoint.init_from={step}",
                                               "model.image_size=96"])  # fmt: skip
    assert list(_init_from_matches(cfg, LaunchContext())) == []
