"""What a checkpoint records about the model and tokenizer that made it.

A checkpoint step folder carries `model_args.json` (the model builder's name and arguments and the
tokenizer section); older runs carry only the run's `config.toml`, from which the same is read.
"""

from __future__ import annotations

import json
from pathlib import Path

MODEL_ARGS_FILE = "model_args.json"


def recorded_model_and_tokenizer(step_dir: Path) -> tuple[dict | None, dict | None]:
    """(model_args, tokenizer section) recorded beside a DCP checkpoint, or (None, None)."""
    args_file = step_dir / MODEL_ARGS_FILE
    if args_file.is_file():
        recorded = json.loads(args_file.read_text())
        return recorded.get("model"), recorded.get("tokenizer")
    for config_file in (step_dir / "config.toml", step_dir.parent.parent / "config.toml"):
        if config_file.is_file():
            from blip_recipes.config.loader import load_toml

            cfg = load_toml(config_file)
            model_args = {"name": cfg.model.name}
            if cfg.model.drop_path_rate is not None:
                model_args["drop_path_rate"] = cfg.model.drop_path_rate
            tok = {"kind": cfg.tokenizer.kind, "path": cfg.tokenizer.path,
                   "max_length": cfg.tokenizer.max_length}  # fmt: skip
            return model_args, tok
    return None, None
