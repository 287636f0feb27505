"""Where recipes and configs live, and the names users may call them by."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import recipes as _recipes_pkg

RECIPES_DIR = Path(_recipes_pkg.__file__).resolve().parent
CONFIGS_DIR = RECIPES_DIR / "configs"


@dataclass(frozen=True)
class RecipeEntry:
    """A recipe file and the configs that go with it."""

    name: str
    file: str
    configs: tuple[str, ...]
    trains: bool = True
    """False for inference recipes: `blip run` skips the training-only config checks."""

    @property
    def path(self) -> Path:
        return RECIPES_DIR / self.file


RECIPES: dict[str, RecipeEntry] = {
    entry.name: entry
    for entry in (
        RecipeEntry("blip_pretrain", "blip_pretrain.py", ("debug", "base", "large")),
        RecipeEntry("blip_eval_retrieval", "blip_eval_retrieval.py", ("eval_retrieval",), False),
        RecipeEntry("blip_capfilt", "blip_capfilt.py", ("capfilt",), False),
        RecipeEntry(
            "blip_finetune_caption", "blip_finetune_caption.py", ("finetune_caption_coco",)
        ),
        RecipeEntry(
            "blip_finetune_retrieval",
            "blip_finetune_retrieval.py",
            ("finetune_retrieval_coco", "finetune_retrieval_flickr"),
        ),
    )
}


def recipe_trains(path: Path) -> bool:
    """Whether the recipe file at ``path`` trains (unregistered recipes are assumed to)."""
    for entry in RECIPES.values():
        if entry.path == Path(path).resolve():
            return entry.trains
    return True


def config_names() -> list[str]:
    """Names of the built-in configs (files in the configs folder, without .toml)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.toml"))


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe path as given, or the file of a registered recipe name.

    Raises:
        FileNotFoundError: naming the argument and the registered recipes.
    """
    path = Path(name_or_path)
    if path.suffix == ".py" and path.is_file():
        return path.resolve()
    stem = path.stem if path.suffix == ".py" else name_or_path
    if stem in RECIPES and RECIPES[stem].path.is_file():
        return RECIPES[stem].path
    raise FileNotFoundError(
        f"recipe '{name_or_path}' is neither a .py file nor a registered recipe "
        f"(registered: {', '.join(sorted(RECIPES))}; see `blip ls`)"
    )


def resolve_config(name_or_path: str) -> Path:
    """A config path as given, or a built-in config by name (``debug``, ``base.toml``...).

    Raises:
        FileNotFoundError: naming the argument and the built-in configs.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path.resolve()
    stem = path.stem if path.suffix == ".toml" else name_or_path
    candidate = CONFIGS_DIR / f"{stem}.toml"
    if path.parent == Path(".") or path.parent == Path("configs"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"config '{name_or_path}' is neither a file nor a built-in config "
        f"(built-in: {', '.join(config_names())}; see `blip ls`)"
    )
