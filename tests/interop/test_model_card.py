"""HF export writes a model card: front matter (license placeholder, transformers, tags), the
run's step, config, data sources and last metrics; placeholders for sources without a run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from blip_recipes.commands.convert_checkpoint import main as convert_main
from blip_recipes.interop.exporters import save_consolidated
from blip_recipes.interop.hf import model_card
from blip_recipes.training.init_checkpoint import save_training_checkpoint
from tests.evaluation.eval_helpers import tiny_model

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
TINY_ARGS = {"name": "blip_pretrain_tiny", "vision_width": 48, "vision_heads": 2, "text_width": 32,
             "text_heads": 2, "text_ffn_dim": 64, "embed_dim": 16, "max_positions": 40,
             "image_size": 32}  # fmt: skip


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    block = text.split("---\n", 2)[1]
    try:
        import yaml
    except ImportError:  # a minimal reader of the keys and the tag list
        out: dict = {"tags": []}
        for line in block.splitlines():
            if line.startswith("- "):
                out["tags"].append(line[2:].strip())
            elif ":" in line and not line.startswith("#"):
                key, _, value = line.partition(":")
                if value.strip():
                    out[key.strip()] = value.strip()
        return out
    return yaml.safe_load(block)


@pytest.fixture(scope="module")
def model():
    m = tiny_model(seed=2)
    m.model_args = {**TINY_ARGS, "vocab_size": m.text.embeddings.word_embeddings.num_embeddings}
    return m


def test_export_of_a_run_carries_step_config_data_and_metrics(model, tmp_path):
    run = tmp_path / "run"
    save_training_checkpoint(model, None, run / "checkpoints" / "step-40", {"kind": "synthetic"})
    config = (ROOT / "configs" / "debug.toml").read_text()
    (run / "config.toml").write_text(config)
    records = [{"step": 30, "time": 1.0, "loss": 9.5}, {"step": 40, "time": 2.0, "loss": 7.25,
                                                        "lr": 0.001}]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"to')
    (run / "eval.jsonl").write_text(json.dumps({"step": 40, "r_mean": 12.5}) + "\n")
    out = tmp_path / "hf"
    assert convert_main([str(run), str(out), "--to", "hf"]) == 0
    text = (out / "README.md").read_text()
    meta = front_matter(text)
    assert meta["license"] == "other"
    assert meta["library_name"] == "transformers"
    assert {"blip", "image-text-retrieval", "image-captioning"} <= set(meta["tags"])
    assert "\n# run\n" in text  # the run's folder; job.name is shared by every run of a config
    assert "- job.name: `debug`" in text
    assert "recipe that made these weights was not recorded" in text  # no run_info.json here
    assert "- step: 40" in text
    assert "model preset: `blip_pretrain_tiny`" in text
    assert "- `synthetic`: num_samples=4096" in text  # data sources from config.toml
    assert "Last training record (step 40)" in text and "| loss | 7.25 |" in text
    assert "| lr | 0.001 |" in text and "9.5" not in text.split("## Metrics")[1].split("##")[0]
    assert "Last evaluation (step 40)" in text and "| r_mean | 12.5 |" in text
    assert "```toml\n" + config.strip() in text  # the training config in full
    assert (out / "retrieval" / "config.json").is_file()  # the export itself is unchanged


def test_export_of_a_bare_file_has_placeholders(model, tmp_path):
    path = save_consolidated(model, tmp_path / "m.safetensors")
    out = tmp_path / "hf"
    assert convert_main([str(path), str(out), "--to", "hf", "--tokenizer-kind", "synthetic"]) == 0
    text = (out / "README.md").read_text()
    assert front_matter(text)["library_name"] == "transformers"
    assert "# m\n" in text and "Not recorded with the checkpoint" in text
    assert "## Metrics" not in text and "## Training config" not in text


def test_non_hf_outputs_get_no_card(model, tmp_path):
    path = save_consolidated(model, tmp_path / "m.safetensors")
    out = tmp_path / "dcp"
    assert convert_main([str(path), str(out), "--tokenizer-kind", "synthetic"]) == 0
    assert not (out / "README.md").exists()
    shutil.rmtree(out)


def test_model_card_function():
    text = model_card("x", step=3, model_args={"name": "blip_pretrain_base"},
                      eval_metrics={"step": 3, "txt_r1": 0.5, "nested": {"a": 1}})  # fmt: skip
    assert "- step: 3" in text and "`blip_pretrain_base`" in text
    assert "| txt_r1 | 0.5 |" in text and "nested" not in text
    assert "\n\n\n" not in text


def test_card_describes_the_recipe_and_data_of_the_run(model, tmp_path):
    run = tmp_path / "my-captioner"
    save_training_checkpoint(model, None, run / "checkpoints" / "step-8", {"kind": "synthetic"})
    (run / "config.toml").write_text(
        '[caption]\nprompt = "a photo of "\n\n[[data.sources]]\nkind = "json"\n'
        'paths = ["mine.json"]\nimage_root = "imgs"\nnum_samples = 4096\nimage_size = 128\n'
    )
    recipe = {"recipe": {"path": "/somewhere/recipes/blip_finetune_caption.py"}}
    (run / "run_info.json").write_text(json.dumps(recipe))
    out = tmp_path / "hf"
    assert convert_main([str(run), str(out), "--to", "hf"]) == 0
    text = (out / "README.md").read_text()
    assert "\n# my-captioner\n" in text and "- recipe: `blip_finetune_caption`" in text
    assert "fine-tuned with the decoder prompt `a photo of `" in text
    assert "a picture of" not in text
    data = text.split("## Training data")[1].split("##")[0]
    assert "- `json`: paths=['mine.json'], image_root=imgs" in data
    assert "num_samples" not in data and "image_size" not in data  # synthetic-only fields
