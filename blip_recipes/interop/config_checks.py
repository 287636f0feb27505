"""Pre-launch checks of the weights and checkpoints a run reads, registered with the config's
checks: the tokenizer (unless the checkpoints bring their own), the BERT / ViT init weights,
the checkpoints to resume or initialise from, and the evaluated checkpoint exist; a missing
asset that ``blip download`` knows is named with the command that fetches it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from blip_recipes.checkpoint import is_complete
from blip_recipes.config.checks import LaunchContext, register_validator
from blip_recipes.config.recorded import recorded_model_and_tokenizer
from blip_recipes.config.sections import Config
from blip_recipes.interop.download import asset_for_path, download_command
from blip_recipes.interop.files import hf_subfolders, latest_dcp_step
from blip_recipes.interop.init_checkpoints import init_source, init_source_problem


def _download_hint(path: str) -> str:
    """`; fetch it with: blip download NAME` when ``path`` is a known asset's folder."""
    asset = asset_for_path(path)
    return f"; fetch it with: {download_command(asset.name, path)}" if asset else ""


def _tokenizer_problem(kind: str, path: str) -> str | None:
    p = Path(path)
    if not p.exists():
        return "does not exist"
    if (
        kind == "wordpiece"
        and p.is_dir()
        and not any((p / name).is_file() for name in ("vocab.txt", "tokenizer.json"))
    ):
        return "is a folder without vocab.txt or tokenizer.json"
    if kind == "bpe" and not p.is_file():
        return "is not a file (expected a .tiktoken ranks file)"
    return None


def _checkpoint_carries_tokenizer(source: str | None) -> bool:
    """True when an evaluated checkpoint brings its own tokenizer files (an HF folder with
    vocab.txt / tokenizer.json, or a DCP checkpoint recording a tokenizer that exists)."""
    if not source or source == "init" or not Path(source).exists():
        return False
    try:
        step = latest_dcp_step(source)
        if step is not None:
            tok = recorded_model_and_tokenizer(step)[1] or {}
            return tok.get("kind") == "synthetic" or bool(
                tok.get("path") and Path(tok["path"]).exists()
            )
        return any(
            (f / name).is_file()
            for f in hf_subfolders(source)
            for name in ("vocab.txt", "tokenizer.json")
        )
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is reported by its own check
        return False


def _tokenizer_needed(cfg: Config) -> bool:
    """False when the checkpoints the run reads bring their own tokenizer: the evaluated one
    (eval.checkpoint), or both CapFilt models (capfilt.captioner and capfilt.filter)."""
    ev = cfg.eval.checkpoint
    if ev and ev != "init" and _checkpoint_carries_tokenizer(ev):
        return False
    c = cfg.capfilt
    models = (c.captioner, c.filter)
    return not (all(models) and all(map(_checkpoint_carries_tokenizer, models)))


def _checkpoint_paths(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    ck = cfg.checkpoint
    if ck.init_from and not is_complete(ck.init_from):
        newest = latest_dcp_step(ck.init_from) if Path(ck.init_from).is_dir() else None
        hint = f" (its newest checkpoint is {newest})" if newest else ""
        what = "does not exist" if not Path(ck.init_from).exists() else (
            "is not a complete DCP checkpoint folder (no .metadata)"
        )  # fmt: skip
        yield (
            f"'checkpoint.init_from' {ck.init_from} {what}{hint}; other layouts (reference .pth, "
            "HF folders) convert with tools/convert_checkpoint.py"
        )
    if not ctx.checkpoints:
        return
    folder = Path(cfg.job.output_dir) / "checkpoints"
    if ck.resume == "none":
        existing = latest_dcp_step(folder) if folder.is_dir() else None
        if existing is not None:
            yield (
                f"'checkpoint.resume' is none but {folder} already holds checkpoint "
                f"{existing.name}: set checkpoint.resume=auto to continue that run, or choose "
                "another job.output_dir to start a new one (checkpoints are never overwritten)"
            )
    elif ck.resume != "auto" and not is_complete(ck.resume):
        path = Path(ck.resume)
        newest = latest_dcp_step(path) if path.is_dir() else None
        what = "does not exist" if not path.exists() else "is not a complete checkpoint folder"
        hint = f" (its newest checkpoint is {newest})" if newest else ""
        yield (
            f"'checkpoint.resume' {ck.resume} {what}{hint}: give a step-N checkpoint folder, "
            "auto (the newest in job.output_dir) or none"
        )


@register_validator
def _tokenizer(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    """The tokenizer files exist, unless the checkpoints the run reads bring their own."""
    tok = cfg.tokenizer
    if tok.kind == "synthetic" or not _tokenizer_needed(cfg):
        return
    if not tok.path:
        yield (
            f"'tokenizer.path' is required for tokenizer.kind='{tok.kind}' "
            "(a local vocab.txt / tokenizer folder or .tiktoken file; nothing is downloaded)"
        )
        return
    problem = _tokenizer_problem(tok.kind, tok.path)
    if problem:
        yield f"'tokenizer.path' {tok.path} {problem}{_download_hint(tok.path)}"


@register_validator
def _weights_and_checkpoints(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    """Init weights, checkpoints to resume or initialise from and the evaluated checkpoint
    exist."""
    for key, value in (("model.text_init", cfg.model.text_init),
                       ("model.vision_init", cfg.model.vision_init)):  # fmt: skip
        source = init_source(value)
        problem = init_source_problem(source) if source else None
        if problem:
            hint = _download_hint(source) or (
                '; point it at local weights, or set it to "none" to start from random weights'
            )
            yield f"'{key}' {source} {problem}{hint}"
    yield from _checkpoint_paths(cfg, ctx)
    evaluated = cfg.eval.checkpoint
    if evaluated and evaluated != "init" and not Path(evaluated).exists():
        yield f"'eval.checkpoint' {evaluated} does not exist{_download_hint(evaluated)}"
