"""Cross-field checks run before anything is built; components register their own.

A validator receives the whole config and the launch context and yields one message per problem.
All messages are collected so that a user sees every mistake at once. Each message names the key
and what it accepts. Besides the config itself, two facts of the machine are checked, because a
run would otherwise fail only at its first write or its first checkpoint: that ``job.output_dir``
can be created and written, and that its file system has room for one checkpoint
(:func:`checkpoint_size_estimate`).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blip_recipes.config._schema import ConfigError
from blip_recipes.config.sections import Config
from blip_recipes.config.sizes import checkpoint_size_estimate, model_preset


@dataclass(frozen=True)
class LaunchContext:
    """What validators may need to know beyond the config."""

    world_size: int = 1
    checkpoints: bool = True
    """The recipe trains and saves training checkpoints: enables the free-disk-space check and
    the training-only checks (queue size against the global batch). Inference recipes
    (evaluation, CapFilt) set it False."""

    @classmethod
    def from_env(cls) -> LaunchContext:
        """World size from torchrun's environment (1 when not launched by it)."""
        return cls(world_size=int(os.environ.get("WORLD_SIZE", "1")))


Validator = Callable[[Config, LaunchContext], Iterable[str]]
_VALIDATORS: list[Validator] = []


def register_validator(fn: Validator) -> Validator:
    """Add a cross-field check (usable as a decorator)."""
    if fn not in _VALIDATORS:
        _VALIDATORS.append(fn)
    return fn


SECTION_CHECK_MODULES = (
    "blip_recipes.training.retrieval_setup",
    "blip_recipes.training.caption",
    "blip_recipes.config.checkpoint_match",
    "blip_recipes.config.data_checks",
)
"""Modules that register the checks of their recipe's own section ([retrieval], [caption])."""


def _register_section_checks() -> None:
    """Import the modules holding section checks, so `blip validate` and `blip run` (before any
    process starts) check what the recipe itself would."""
    import importlib

    for name in SECTION_CHECK_MODULES:
        importlib.import_module(name)


def validate(cfg: Config, context: LaunchContext | None = None) -> None:
    """Run every registered validator; when all pass, print the warnings of
    :mod:`blip_recipes.config.advice` (valid settings that will not do what one expects).

    Raises:
        ConfigError: with all problems, one per line.
    """
    context = context or LaunchContext.from_env()
    _register_section_checks()
    errors = [msg for fn in _VALIDATORS for msg in fn(cfg, context)]
    if errors:
        raise ConfigError("\n".join(errors))
    from blip_recipes.config.advice import print_advice

    print_advice(cfg, context.world_size, trains=context.checkpoints)


def _positive_fields(cfg: Config) -> list[tuple[str, Any]]:
    """Every count and size that must be > 0 (sizes, lengths, batch sizes, intervals,
    timeouts), with its value."""
    ev, cf = cfg.eval, cfg.capfilt
    fields = [
        ("data.batch_size", cfg.data.batch_size),
        ("model.queue_size", cfg.model.queue_size),
        ("model.image_size", cfg.model.image_size),
        ("model.embed_dim", cfg.model.embed_dim),
        ("checkpoint.interval", cfg.checkpoint.interval),
        ("metrics.log_every", cfg.metrics.log_every),
        ("tokenizer.max_length", cfg.tokenizer.max_length),
        ("training.epochs", cfg.training.epochs),
        ("job.collective_timeout_s", cfg.job.collective_timeout_s),
        ("job.stop_timeout_s", cfg.job.stop_timeout_s),
        ("eval.k_test", ev.k_test),
        ("eval.batch_size", ev.batch_size),
        ("capfilt.unit_size", cf.unit_size),
        ("capfilt.num_captions", cf.num_captions),
        ("capfilt.batch_size", cf.batch_size),
        ("capfilt.max_length", cf.max_length),
        ("capfilt.text_max_length", cf.text_max_length),
        ("caption.max_length", cfg.caption.max_length),
    ]
    for i, src in enumerate(cfg.data.sources):
        if src.kind == "synthetic":
            fields += [
                (f"data.sources.{i}.num_samples", src.num_samples),
                (f"data.sources.{i}.image_size", src.image_size),
            ]
    return fields


@register_validator
def _positive_counts(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    if ctx.world_size < 1:
        yield f"the world size (ranks in the job) must be >= 1, got {ctx.world_size}"
    for key, value in _positive_fields(cfg):
        if _outside(value, 0, low_open=True):
            yield f"'{key}' must be positive, got {value}"
    if cfg.training.steps is not None and cfg.training.steps <= 0:
        yield f"'training.steps' must be positive or none, got {cfg.training.steps}"
    if cfg.data.num_workers < 0:
        yield f"'data.num_workers' must be >= 0, got {cfg.data.num_workers}"
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        yield f"'data.max_bad_fraction' must be in [0, 1], got {cfg.data.max_bad_fraction}"
    if not 0.0 <= cfg.model.momentum <= 1.0:
        yield f"'model.momentum' must be in [0, 1], got {cfg.model.momentum}"
    if len(cfg.optimizer.betas) != 2:
        yield f"'optimizer.betas' must hold two numbers, got {cfg.optimizer.betas}"


def _outside(value: float, low: float, high: float = math.inf, low_open: bool = False) -> bool:
    """True when ``value`` is not in [low, high] ((low, high] with ``low_open``) or not finite."""
    if not isinstance(value, (int, float)) or math.isnan(value):
        return True
    return value < low or (low_open and value == low) or value > high


@register_validator
def _ranges(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    """Numbers that load fine but fail (or silently misbehave) once the run is under way."""
    t, o, s, d = cfg.training, cfg.optimizer, cfg.lr_scheduler, cfg.data
    checks: list[tuple[str, Any, str, bool]] = [
        ("training.max_nonfinite_steps", t.max_nonfinite_steps, "an integer >= 1 (consecutive "
         "non-finite steps that stop the run)", t.max_nonfinite_steps < 1),
        ("optimizer.lr", o.lr, "a finite number > 0", _outside(o.lr, 0.0, low_open=True)
         or math.isinf(o.lr)),
        ("optimizer.weight_decay", o.weight_decay, ">= 0", _outside(o.weight_decay, 0.0)
         or math.isinf(o.weight_decay)),
        ("optimizer.eps", o.eps, "> 0", _outside(o.eps, 0.0, low_open=True)),
        ("lr_scheduler.warmup_steps", s.warmup_steps, ">= 0", s.warmup_steps < 0),
        ("lr_scheduler.warmup_lr", s.warmup_lr, ">= 0", _outside(s.warmup_lr, 0.0)),
        ("lr_scheduler.min_lr", s.min_lr, ">= 0", _outside(s.min_lr, 0.0)),
        ("lr_scheduler.decay_rate", s.decay_rate, "in (0, 1]",
         _outside(s.decay_rate, 0.0, 1.0, low_open=True)),
        ("training.alpha", t.alpha, "in [0, 1]", _outside(t.alpha, 0.0, 1.0)),
        ("training.alpha_ramp_epochs", t.alpha_ramp_epochs, ">= 0", _outside(t.alpha_ramp_epochs, 0.0)),
        ("data.prefetch_factor", d.prefetch_factor, "an integer >= 1 (batches each loader worker "
         "prepares ahead)", d.prefetch_factor < 1),
        ("data.min_image_size", d.min_image_size, "an integer >= 1 (pixels)", d.min_image_size < 1),
        ("data.max_aspect_ratio", d.max_aspect_ratio, ">= 1 (long side / short side)",
         _outside(d.max_aspect_ratio, 1.0)),
        ("data.max_words", d.max_words, "an integer >= 1", d.max_words < 1),
        ("data.min_scale", d.min_scale, "in (0, 1]", _outside(d.min_scale, 0.0, 1.0, low_open=True)),
        ("data.shuffle_buffer", d.shuffle_buffer, "an integer >= 1", d.shuffle_buffer < 1),
        ("data.bad_fraction_min_samples", d.bad_fraction_min_samples, ">= 0",
         d.bad_fraction_min_samples < 0),
        ("data.timeout_s", d.timeout_s, "> 0 (seconds)", _outside(d.timeout_s, 0.0, low_open=True)),
        ("checkpoint.keep_latest_k", cfg.checkpoint.keep_latest_k, ">= 0 (0 keeps all)",
         cfg.checkpoint.keep_latest_k < 0),
    ]  # fmt: skip
    if t.grad_clip is not None:
        checks.append(("training.grad_clip", t.grad_clip, "> 0 or none",
                       _outside(t.grad_clip, 0.0, low_open=True)))  # fmt: skip
    if t.steps_per_epoch is not None:
        checks.append(("training.steps_per_epoch", t.steps_per_epoch, "an integer >= 1 or none",
                       t.steps_per_epoch < 1))  # fmt: skip
    for i, beta in enumerate(o.betas[:2]):
        checks.append((f"optimizer.betas.{i}", beta, "in [0, 1)", _outside(beta, 0.0, 1.0)
                       or beta == 1.0))  # fmt: skip
    for key, value, accepted, bad in checks:
        if bad:
            yield f"'{key}' must be {accepted}, got {value}"
    for i, src in enumerate(d.sources):
        if src.kind == "synthetic" and 0 < src.image_size < d.min_image_size:
            yield (
                f"'data.sources.{i}.image_size' ({src.image_size}) is below "
                f"'data.min_image_size' ({d.min_image_size}): every generated image would be a "
                "bad sample"
            )


@register_validator
def _model_shape(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    """What the model's shape allows: whole patches, captions within the position embeddings."""
    preset = model_preset(cfg.model.name)
    if preset is None:
        return
    patch, positions = preset["patch_size"], preset["max_positions"]
    size = cfg.model.image_size
    if size > 0 and size % patch:
        lower, upper = max(patch, size // patch * patch), (size // patch + 1) * patch
        yield (
            f"'model.image_size' must be a multiple of the patch size {patch} of "
            f"{cfg.model.name} (e.g. {lower} or {upper}), got {size}"
        )
    lengths = [("tokenizer.max_length", cfg.tokenizer.max_length)]  # (<= 0: _positive_counts)
    if cfg.eval.every_steps > 0:
        lengths.append(("eval.text_max_length", cfg.eval.text_max_length))
    for key, length in lengths:
        if length > positions or (key.startswith("eval.") and length < 1):
            yield (
                f"'{key}' must be in [1, {positions}] for {cfg.model.name} (its text position "
                f"embeddings hold {positions} tokens), got {length}"
            )


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _not_writable(folder: Path) -> str | None:
    """Why ``folder`` cannot take new files, or None. ``os.access`` first, then a real probe: an
    unnamed temporary file (``O_TMPFILE``, nothing visible is left), which also catches
    read-only mounts, NFS root squashing and pseudo file systems that ``os.access`` misses."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return "is not writable"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return f"refuses new files ({e.strerror or e})"
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n < 2**40 else f"{n / 2**40:.2f} TiB"


@register_validator
def _output_dir(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    """``job.output_dir`` can be created and written, and has room for one checkpoint."""
    out = Path(cfg.job.output_dir)
    if out.exists() and not out.is_dir():
        yield f"'job.output_dir' {out} exists and is not a folder: choose a folder path"
        return
    base = _nearest_existing(out)
    if not base.is_dir():
        yield f"'job.output_dir' {out} cannot be created: {base} is a file, not a folder"
        return
    targets = [base] + [p for p in (out, out / "checkpoints") if p.is_dir() and p != base]
    for target in targets:
        problem = _not_writable(target)
        if problem:
            created = "" if out.exists() else " (the folder would be created there)"
            yield (
                f"'job.output_dir' {out} cannot be written: {target} {problem} for this user "
                f"(uid {os.getuid()}){created}; choose a writable folder or fix its permissions"
            )
            return
    if not ctx.checkpoints:
        return
    try:
        estimate = checkpoint_size_estimate(cfg)
    except Exception:  # noqa: BLE001 - a config another validator rejects (e.g. image size)
        return
    free = shutil.disk_usage(base).free
    if free < estimate["bytes"]:
        yield (
            f"'job.output_dir' {out}: {_gib(free)} free on its file system ({base}), but one "
            f"checkpoint of {cfg.model.name} needs about {_gib(estimate['bytes'])} "
            f"({estimate['parameters'] / 1e6:.1f}M parameters x 3 (weights + 2 AdamW moments) + "
            f"{estimate['momentum_parameters'] / 1e6:.1f}M momentum parameters + "
            f"{estimate['queue_values'] / 1e6:.1f}M queue values, 4 bytes each): free some "
            "space or choose another job.output_dir"
        )


@register_validator
def _queue_holds_whole_global_batches(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    if not ctx.checkpoints:
        return
    global_batch = cfg.data.batch_size * ctx.world_size
    if global_batch > 0 and cfg.model.queue_size % global_batch != 0:
        yield (
            f"'model.queue_size' ({cfg.model.queue_size}) must be a multiple of the global batch "
            f"'data.batch_size' x world size = {cfg.data.batch_size} x {ctx.world_size} = "
            f"{global_batch}"
        )


@register_validator
def _data_sources(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    if not cfg.data.sources:
        yield "'data.sources' is empty: add at least one [[data.sources]] table"
    for i, src in enumerate(cfg.data.sources):
        if src.kind != "synthetic" and not src.paths:
            yield f"'data.sources.{i}.paths' is empty for kind '{src.kind}': list its files"
        if src.weight <= 0:
            yield f"'data.sources.{i}.weight' must be positive, got {src.weight}"
    if cfg.tokenizer.kind != "synthetic" and not cfg.tokenizer.path and _tokenizer_needed(cfg):
        yield (
            f"'tokenizer.path' is required for tokenizer.kind='{cfg.tokenizer.kind}' "
            "(a local vocab.txt / tokenizer folder or .tiktoken file; nothing is downloaded)"
        )


@register_validator
def _evaluation(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    if cfg.eval.every_steps < 0:
        yield f"'eval.every_steps' must be >= 0, got {cfg.eval.every_steps}"
    if cfg.eval.every_steps > 0 and not cfg.eval.annotation:
        yield "'eval.every_steps' > 0 needs 'eval.annotation' (a held-out retrieval set)"


@register_validator
def _parallel(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    p = cfg.parallel
    if p.activation_checkpointing == "vit_last_n" and p.ac_vit_layers <= 0:
        yield "'parallel.ac_vit_layers' must be positive with activation_checkpointing='vit_last_n'"
    if p.ac_vit_layers < 0:
        yield f"'parallel.ac_vit_layers' must be >= 0, got {p.ac_vit_layers}"
    if p.dp_replicate < 0:
        yield f"'parallel.dp_replicate' must be >= 0 (0 = one replica per node), got {p.dp_replicate}"
    elif p.data_parallel == "hsdp" and p.dp_replicate and ctx.world_size % p.dp_replicate:
        yield (
            f"'parallel.dp_replicate' ({p.dp_replicate}) must divide the world size "
            f"{ctx.world_size} for data_parallel='hsdp' (shard degree = world / dp_replicate)"
        )
    if cfg.training.grad_accum_steps < 1:
        yield f"'training.grad_accum_steps' must be >= 1, got {cfg.training.grad_accum_steps}"
    if cfg.checkpoint.signal_check_every < 1:
        yield (
            f"'checkpoint.signal_check_every' must be >= 1, got {cfg.checkpoint.signal_check_every}"
        )


# ------------------------------------------------------------------ files the run will read
def _examples(paths: list[str], limit: int = 3) -> str:
    more = f" (and {len(paths) - limit} more)" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


def _download_hint(path: str) -> str:
    """`; fetch it with: blip download NAME` when ``path`` is a known asset's folder."""
    from blip_recipes.interop.download import asset_for_path, download_command

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
    from blip_recipes.interop.files import hf_subfolders, latest_dcp_step

    try:
        step = latest_dcp_step(source)
        if step is not None:
            from blip_recipes.config.recorded import recorded_model_and_tokenizer

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


def _holds_no_records(path: Path, small: int = 1 << 20) -> bool:
    """True for an annotation file that is (cheaply seen to be) empty: a JSON list ``[]`` or
    JSON Lines with no record. Files above ``small`` bytes are assumed to hold some."""
    try:
        if path.stat().st_size > small:
            return False
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return False
    if not text:
        return True
    if path.suffix == ".jsonl":
        return False
    return "".join(text.split()) == "[]"


def _source_files(i: int, src: Any, cfg: Config) -> Iterable[str]:
    key = f"data.sources.{i}"
    if src.kind in ("json", "jsonl"):
        missing = [p for p in src.paths if not Path(p).is_file()]
        if missing:
            yield (
                f"'{key}.paths': {len(missing)} of {len(src.paths)} annotation file(s) not "
                f"found: {_examples(missing)}"
            )
        elif src.paths and all(_holds_no_records(Path(p)) for p in src.paths):
            yield (
                f"'{key}.paths': {_examples(src.paths)} hold(s) no records (an empty annotation "
                "file): there is nothing to train on"
            )
        if src.image_root and not Path(src.image_root).is_dir():
            yield f"'{key}.image_root' {src.image_root} is not a folder (it does not exist)"
    elif src.kind == "shards":
        from blip_recipes.data.remote import is_remote, local_path
        from blip_recipes.data.shards import expand_braces

        for pattern in src.paths:
            files = [f for f in expand_braces(pattern) if not is_remote(f)]
            if not files:
                continue  # remote URLs are read (and reported) when streamed
            missing = [f for f in files if not Path(local_path(f)).is_file()]
            if len(missing) == len(files):
                yield f"'{key}.paths': no file matches {pattern}"
            elif missing:
                yield (
                    f"'{key}.paths': {len(missing)} of {len(files)} shard(s) of {pattern} not "
                    f"found: {_examples(missing)}"
                )
        if cfg.training.steps_per_epoch is None:
            yield from _shard_size_problem(key, src.paths)


def _shard_size_problem(key: str, patterns: list[str]) -> Iterable[str]:
    """Without training.steps_per_epoch, every shard's size must be found beside it."""
    from blip_recipes.data.shards import expand_braces, shard_sizes

    shards = [f for p in patterns for f in expand_braces(p)]
    try:
        unknown = shard_sizes(shards)[1]
    except Exception as e:  # noqa: BLE001 - unreadable size files are reported, not raised
        unknown, reason = shards, f" ({e})"
    else:
        reason = ""
    if unknown:
        yield (
            f"'{key}': the number of samples of {len(unknown)} of {len(shards)} shard(s) is "
            f"unknown, e.g. {_examples(unknown)}{reason}: write a sizes.json "
            '({"shard-00000.tar": 1000, ...}) beside the shards, keep img2dataset\'s '
            "NNNNN_stats.json files beside them, or set 'training.steps_per_epoch' "
            "(samples per epoch / global batch)"
        )


def _checkpoint_paths(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    from blip_recipes.checkpoint import is_complete
    from blip_recipes.interop.files import latest_dcp_step

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
def _files(cfg: Config, ctx: LaunchContext) -> Iterable[str]:
    """Every file the run reads at start-up exists: annotations, image roots, shards,
    tokenizer, init weights, checkpoints to resume or initialise from, evaluation data."""
    from blip_recipes.interop.init_checkpoints import init_source, init_source_problem

    tok, ev = cfg.tokenizer, cfg.eval
    evaluated = ev.checkpoint if ev.checkpoint and ev.checkpoint != "init" else None
    if tok.kind != "synthetic" and tok.path and _tokenizer_needed(cfg):
        problem = _tokenizer_problem(tok.kind, tok.path)
        if problem:
            yield f"'tokenizer.path' {tok.path} {problem}{_download_hint(tok.path)}"
    for key, value in (("model.text_init", cfg.model.text_init),
                       ("model.vision_init", cfg.model.vision_init)):  # fmt: skip
        source = init_source(value)
        problem = init_source_problem(source) if source else None
        if problem:
            hint = _download_hint(source) or (
                '; point it at local weights, or set it to "none" to start from random weights'
            )
            yield f"'{key}' {source} {problem}{hint}"
    kinds = {s.kind for s in cfg.data.sources}
    if "shards" in kinds and kinds != {"shards"} and cfg.training.steps_per_epoch is not None:
        for i, src in enumerate(cfg.data.sources):  # the mix's share needs the shard sizes
            if src.kind == "shards":
                for problem in _shard_size_problem(f"data.sources.{i}.paths", src.paths):
                    yield f"{problem}; mixing shards with json/jsonl/synthetic sources needs them"
    for i, src in enumerate(cfg.data.sources):
        yield from _source_files(i, src, cfg)
    yield from _checkpoint_paths(cfg, ctx)
    if evaluated and not Path(evaluated).exists():
        hint = _download_hint(evaluated)
        yield f"'eval.checkpoint' {evaluated} does not exist{hint}"
    if ev.annotation and (ev.every_steps > 0 or ev.checkpoint):
        if not Path(ev.annotation).is_file():
            yield f"'eval.annotation' {ev.annotation} does not exist (or is not a file)"
        if ev.image_root and not Path(ev.image_root).is_dir():
            yield f"'eval.image_root' {ev.image_root} is not a folder (it does not exist)"


__all__ = [
    "ConfigError",
    "LaunchContext",
    "checkpoint_size_estimate",
    "register_validator",
    "validate",
]
