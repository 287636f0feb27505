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
    unread: tuple[str, ...] = ()
    """Config keys the recipe does not read: no check or warning is given about them."""

    @property
    def path(self) -> Path:
        return RECIPES_DIR / self.file


_NO_WARMUP = ("lr_scheduler.warmup_steps",)  # per-epoch cosine schedules without warmup
_NO_QUEUE = ("momentum.queue_size",)  # no momentum encoders or feature queues

RECIPES: dict[str, RecipeEntry] = {
    entry.name: entry
    for entry in (
        RecipeEntry("blip_pretrain", "blip_pretrain.py", ("debug", "base", "large")),
        RecipeEntry("blip_eval_retrieval", "blip_eval_retrieval.py", ("eval_retrieval",), False),
        RecipeEntry(
            "blip_eval_retrieval_video",
            "blip_eval_retrieval_video.py",
            ("eval_retrieval_msrvtt",),
            False,
        ),
        RecipeEntry("blip_capfilt", "blip_capfilt.py", ("capfilt",), False),
        RecipeEntry("blip_eval_nocaps", "blip_eval_nocaps.py", ("eval_nocaps",), False),
        RecipeEntry(
            "blip_finetune_caption",
            "blip_finetune_caption.py",
            ("finetune_caption_coco",),
            unread=_NO_WARMUP + _NO_QUEUE,
        ),
        RecipeEntry(
            "blip_finetune_vqa",
            "blip_finetune_vqa.py",
            ("finetune_vqa",),
            unread=_NO_WARMUP + _NO_QUEUE,
        ),
        RecipeEntry(
            "blip_finetune_retrieval",
            "blip_finetune_retrieval.py",
            ("finetune_retrieval_coco", "finetune_retrieval_flickr"),
            unread=_NO_WARMUP,
        ),
        RecipeEntry(
            "blip_finetune_nlvr",
            "blip_finetune_nlvr.py",
            ("finetune_nlvr",),
            unread=_NO_WARMUP + _NO_QUEUE,
        ),
        RecipeEntry("blip_eval_zeroshot", "blip_eval_zeroshot.py", ("eval_zeroshot",), False),
    )
}


def recipe_entry(path: Path) -> RecipeEntry | None:
    """The registered recipe at ``path`` (None for a recipe of the user's own)."""
    for entry in RECIPES.values():
        if entry.path == Path(path).resolve():
            return entry
    return None


def recipe_trains(path: Path) -> bool:
    """Whether the recipe file at ``path`` trains (unregistered recipes are assumed to)."""
    entry = recipe_entry(path)
    return entry.trains if entry else True


def recipe_unread(path: Path) -> frozenset[str]:
    """Config keys the recipe at ``path`` does not read (none known for the user's own)."""
    entry = recipe_entry(path)
    return frozenset(entry.unread) if entry else frozenset()


def config_names() -> list[str]:
    """Names of the built-in configs (files in the configs folder, without .toml)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.toml"))


def _looks_like_path(arg: str, suffix: str) -> bool:
    """A folder separator or the file suffix makes an argument a path, never a name."""
    return "/" in arg or "\\" in arg or arg.endswith(suffix)


def _nearest(word: str, names: list[str]) -> str:
    """`; did you mean 'x'?` for the closest of ``names``, or the whole list."""
    import difflib

    close = difflib.get_close_matches(word, names, n=1, cutoff=0.5)
    if close:
        return f"did you mean '{close[0]}'? (registered: {', '.join(names)}; see `blip ls`)"
    return f"registered: {', '.join(names)}; see `blip ls`"


def resolve_recipe(name_or_path: str) -> Path:
    """The recipe file a path names, or the file of a registered recipe name.

    An argument with a ``/`` or ending in ``.py`` is a path and must exist: a typo in a copied
    recipe's path never silently runs the packaged recipe. Only bare names are looked up.

    Raises:
        FileNotFoundError: naming the argument and the nearest registered recipe.
    """
    names = sorted(RECIPES)
    if _looks_like_path(name_or_path, ".py"):
        path = Path(name_or_path)
        if path.is_file():
            return path.resolve()
        what = "is a folder, not a .py file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"recipe file '{name_or_path}' {what}; {_nearest(path.stem, names)}"
        )
    if name_or_path in RECIPES and RECIPES[name_or_path].path.is_file():
        return RECIPES[name_or_path].path
    raise FileNotFoundError(
        f"recipe '{name_or_path}' is not a registered recipe; {_nearest(name_or_path, names)}"
    )


def resolve_config(name_or_path: str) -> Path:
    """The config file a path names, or a built-in config by name (``debug``, ``base``...).

    An argument with a ``/`` or ending in ``.toml`` is a path and must exist (``configs/x.toml``
    from a checkout exists: ``configs`` is the built-in folder); only bare names are looked up.

    Raises:
        FileNotFoundError: naming the argument and the nearest built-in config.
    """
    names = config_names()
    if _looks_like_path(name_or_path, ".toml"):
        path = Path(name_or_path)
        if path.is_file():
            return path.resolve()
        hint = _nearest(path.stem, names).replace("registered", "built-in")
        raise FileNotFoundError(f"config file '{name_or_path}' does not exist; {hint}")
    candidate = CONFIGS_DIR / f"{name_or_path}.toml"
    if candidate.is_file():
        return candidate
    hint = _nearest(name_or_path, names).replace("registered", "built-in")
    raise FileNotFoundError(f"config '{name_or_path}' is not a built-in config; {hint}")


def recipe_record(path: Path | None) -> dict[str, object] | None:
    """What ``run_info.json`` keeps of the recipe file that ran: its absolute path, whether it
    is the packaged one, and its sha256 (an edited copy is told apart from the original)."""
    import hashlib

    if path is None:
        return None
    path = Path(path).resolve()
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        digest = None
    builtin = any(entry.path == path for entry in RECIPES.values())
    return {"path": str(path), "builtin": builtin, "sha256": digest}


def class_file(cls: type) -> Path | None:
    """The file that defines ``cls`` (a recipe class), also when its module was loaded from a
    path without being registered in ``sys.modules`` (then ``inspect.getfile`` fails)."""
    import inspect

    for value in vars(cls).values():
        func = getattr(value, "__func__", value)  # classmethod / staticmethod
        if inspect.isfunction(func):
            return Path(func.__code__.co_filename)
    return None
