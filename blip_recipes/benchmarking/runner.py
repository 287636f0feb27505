"""Run the training step the recipe runs (one variant at a time) and the HF baseline, timed alike.

Each variant builds, from a config, exactly what the pretraining recipe builds with the same
library calls (``build_pretraining``: model on meta, float8, AC, compile, FSDP2, momentum state;
then the optimizer, the schedule and ``PretrainStep.from_config``), and calls that step on batches
that are either already on the device (``synthetic-device``: what the model and optimizer can do)
or drawn from the run's loader (``loader``: what the input pipeline lets through). The baseline
runs the same sizes and batches. Results are plain dicts (see :func:`run_benchmark`) so the tool
can print and save them as JSON.
"""

from __future__ import annotations

import gc
import itertools
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from blip_recipes.benchmarking.inputs import TEXT_LENGTH, synthetic_batches, write_bert_layout_vocab
from blip_recipes.benchmarking.profiling import instrument_step, profile_steps
from blip_recipes.benchmarking.report import environment, one_line
from blip_recipes.benchmarking.settings import (
    DATA_MODES,
    BenchmarkSettings,
    benchmark_config,
    resolve_device,
)
from blip_recipes.benchmarking.timing import StepTimer, count_host_syncs, reset_peak_memory
from blip_recipes.benchmarking.variants import Variant
from blip_recipes.metrics import effective_mfu, flops_per_sample, max_memory_gib, peak_flops


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {
            "peak_memory_gib": max_memory_gib(device),
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
            "peak_memory_kind": "cuda_max_allocated",
        }
    return {"peak_memory_gib": max_memory_gib(device), "peak_memory_kind": "process_max_rss"}


def _compile_stats() -> dict[str, int]:
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        return {}
    return {
        "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def _reset_between_runs(device: torch.device) -> None:
    gc.collect()
    try:
        import torch._dynamo
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()  # compile_stats then count this run only
    except Exception:  # pragma: no cover
        pass
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak_memory(device)


def _timed_loop(
    step: Callable[[dict], Any],
    next_batch: Callable[[], dict],
    settings: BenchmarkSettings,
    device: torch.device,
    batch_size: int,
) -> dict[str, Any]:
    """Warm up, then time ``settings.steps`` steps (data fetch included: it is part of a step)."""
    start = time.perf_counter()
    for _ in range(settings.warmup):
        step(next_batch())
    _sync(device)
    warmup_s = time.perf_counter() - start
    timer = StepTimer(device)
    data_wait = 0.0
    for _ in range(settings.steps):
        timer.start()
        t0 = time.perf_counter()
        batch = next_batch()
        data_wait += time.perf_counter() - t0
        step(batch)
        timer.stop()
    summary = timer.summary(batch_size).as_dict()
    summary["warmup_s"] = warmup_s
    summary["data_wait_frac"] = data_wait / summary["window_s"] if summary["window_s"] else 0.0
    return summary


def _cycle(batches: list[dict]) -> Callable[[], dict]:
    iterator: Iterator[dict] = itertools.cycle(batches)
    return lambda: next(iterator)


def _mfu(settings: BenchmarkSettings, samples_per_sec: float, device: torch.device):
    if settings.resolved_image_size() != 224:
        return None  # the fixed FLOP counts are for 224 px, 30 tokens
    return effective_mfu(samples_per_sec, flops_per_sample(settings.model), peak_flops(device))


@dataclass
class _OursRun:
    """What one variant builds: the recipe's components for `cfg`, on this process."""

    cfg: Any
    tokenizer: Any
    step_fn: Any
    compute_dtype: torch.dtype
    loader: Any = None

    @classmethod
    def build(cls, cfg: Any, with_loader: bool) -> _OursRun:
        from blip_recipes.data import build_tokenizer, build_train_loader
        from blip_recipes.parallel import init_distributed
        from blip_recipes.training.build import build_pretraining, compute_dtype
        from blip_recipes.training.optim import build_lr_scheduler, build_optimizer
        from blip_recipes.training.pretrain import PretrainStep

        par = cfg.parallel
        info = init_distributed(par.device, par.data_parallel, par.dp_replicate)
        dtype = compute_dtype(cfg.training.mixed_precision, info.device)
        tokenizer = build_tokenizer(cfg.tokenizer)
        loader = None
        if with_loader:
            loader = build_train_loader(cfg.data, tokenizer, image_size=cfg.model.image_size,
                                        seed=cfg.job.seed, rank=info.rank,
                                        world_size=info.world_size)  # fmt: skip
        model, momentum, _ = build_pretraining(cfg, tokenizer, info, dtype)
        optimizer = build_optimizer(model, cfg.optimizer, info.device.type)
        steps = cfg.training.steps
        lr_scheduler = build_lr_scheduler(optimizer, cfg.lr_scheduler, peak_lr=cfg.optimizer.lr,
                                          steps_per_epoch=steps, total_steps=steps)  # fmt: skip
        step_fn = PretrainStep.from_config(cfg, model, optimizer, lr_scheduler, info, dtype,
                                           momentum=momentum)  # fmt: skip
        return cls(cfg, tokenizer, step_fn, dtype, loader)

    def close(self) -> None:
        from blip_recipes.parallel import shutdown_distributed

        self.step_fn = self.loader = None
        shutdown_distributed()


def run_recipe_variant(
    settings: BenchmarkSettings,
    variant: Variant,
    batch_size: int,
    device: torch.device,
    vocab_path: Path | None,
) -> dict[str, Any]:
    """Build the run of ``variant`` with the recipe's library calls and time its step."""
    from blip_recipes.data import normalize_images
    from blip_recipes.training.step import DeviceBatch

    result: dict[str, Any] = {"name": variant.name, "kind": "ours", "batch_size": batch_size}
    run = None
    _reset_between_runs(device)
    with tempfile.TemporaryDirectory(prefix="blip-bench-") as out:
        try:
            cfg = benchmark_config(settings, variant.for_device(device.type), batch_size, out,
                                   vocab_path, device)  # fmt: skip
            result["overrides"] = list(variant.for_device(device.type))
            result["queue_size"] = cfg.momentum.queue_size
            t0 = time.perf_counter()
            run = _OursRun.build(cfg, with_loader=settings.data == "loader")
            result["setup_s"] = time.perf_counter() - t0
            result["compute_dtype"] = str(run.compute_dtype).replace("torch.", "")
            result["fused_adamw"] = run.step_fn.fused
            last: dict[str, Any] = {"step": 0}
            alpha = cfg.momentum.alpha

            def step(batch: dict) -> None:
                micro = DeviceBatch(
                    normalize_images(batch["images"].to(device, non_blocking=True)),
                    batch["input_ids"].to(device, non_blocking=True),
                    batch["attention_mask"].to(device, non_blocking=True),
                )
                last["result"] = run.step_fn([micro], last["step"], alpha)
                last["step"] += 1

            if settings.data == "loader":
                next_batch = run.loader.__next__
            else:
                tok = run.tokenizer
                special = {"pad": tok.pad_token_id, "cls": tok.cls_token_id,
                           "sep": tok.sep_token_id}  # fmt: skip
                next_batch = _cycle(synthetic_batches(
                    batch_size, cfg.model.image_size, tok.vocab_size, special, device,
                    seed=settings.seed))  # fmt: skip
            reset_peak_memory(device)
            result.update(_timed_loop(step, next_batch, settings, device, batch_size))
            result.update(_memory(device))
            out_ = last["result"].output
            result["losses"] = {k: float(getattr(out_, k).detach()) for k in
                                ("loss", "loss_ita", "loss_itm", "loss_lm")}  # fmt: skip
            result["last_step_applied"] = bool(last["result"].ok)
            result["compile_stats"] = _compile_stats() if variant.compile else {}
            result["host_syncs"] = count_host_syncs(lambda: step(next_batch()), device)
            if settings.profile:
                trace = _trace_path(settings, f"ours-{variant.name}-b{batch_size}")
                with instrument_step(run.step_fn):
                    result["profile"] = profile_steps(
                        lambda: step(next_batch()), settings.profile_steps, device, trace
                    )
        except Exception as e:  # one failing variant (OOM, unsupported float8) must not end the run
            result["error"] = f"{type(e).__name__}: {e}"
            result["traceback"] = traceback.format_exc(limit=8)
        finally:
            if run is not None:
                run.close()
            run = None
            _reset_between_runs(device)
    return result


def _trace_path(settings: BenchmarkSettings, name: str) -> str | None:
    if not settings.trace_dir:
        return None
    os.makedirs(settings.trace_dir, exist_ok=True)
    return str(Path(settings.trace_dir) / f"{name}.json")


def run_baseline(
    settings: BenchmarkSettings, batch_size: int, device: torch.device, vocab_path: Path | None
) -> dict[str, Any]:
    """Time the HF-composed reference step on the same sizes and batches as the recipe."""
    from blip_recipes.benchmarking.baseline_hf import build_hf_baseline
    from blip_recipes.data import build_tokenizer, build_train_loader

    precision = settings.baseline_precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    result: dict[str, Any] = {"name": f"baseline-hf-{precision}", "kind": "baseline",
                              "batch_size": batch_size}  # fmt: skip
    _reset_between_runs(device)
    baseline = None
    with tempfile.TemporaryDirectory(prefix="blip-bench-") as out:
        try:
            cfg = benchmark_config(settings, (), batch_size, out, vocab_path, device)
            tok = build_tokenizer(cfg.tokenizer)
            result["queue_size"] = cfg.momentum.queue_size
            t0 = time.perf_counter()
            baseline = build_hf_baseline(
                settings.model,
                image_size=cfg.model.image_size,
                queue_size=cfg.momentum.queue_size,
                device=device,
                bf16=precision == "bf16",
                lr=cfg.optimizer.lr,
                seed=settings.seed,
                vocab_size=tok.vocab_size,
                embed_dim=cfg.model.embed_dim,
                pad_token_id=tok.pad_token_id,
                enc_token_id=tok.enc_token_id,
                dec_token_id=tok.dec_token_id,
            )
            result["setup_s"] = time.perf_counter() - t0
            result["compute_dtype"] = "bf16-autocast" if precision == "bf16" else "float32"
            if settings.data == "loader":
                loader = build_train_loader(cfg.data, tok, image_size=cfg.model.image_size,
                                            seed=settings.seed)  # fmt: skip
                next_batch = loader.__next__
            else:
                special = {"pad": tok.pad_token_id, "cls": tok.cls_token_id,
                           "sep": tok.sep_token_id}  # fmt: skip
                next_batch = _cycle(synthetic_batches(
                    batch_size, cfg.model.image_size, tok.vocab_size, special, device,
                    seed=settings.seed))  # fmt: skip
            alpha = cfg.momentum.alpha

            def step(batch: dict) -> None:
                baseline.train_step(batch, alpha=alpha)

            reset_peak_memory(device)
            result.update(_timed_loop(step, next_batch, settings, device, batch_size))
            result.update(_memory(device))
            ita, itm, lm = baseline.last_losses
            result["losses"] = {"loss": ita + itm + lm, "loss_ita": ita, "loss_itm": itm,
                                "loss_lm": lm}  # fmt: skip
            result["host_syncs"] = count_host_syncs(lambda: step(next_batch()), device)
            if settings.profile:
                trace = _trace_path(settings, f"baseline-b{batch_size}")
                result["profile"] = profile_steps(
                    lambda: step(next_batch()), settings.profile_steps, device, trace
                )
        except Exception as e:
            result["error"] = f"{type(e).__name__}: {e}"
            result["traceback"] = traceback.format_exc(limit=8)
        finally:
            baseline = None
            _reset_between_runs(device)
    return result


def merge_rounds(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One result per run from ``--repeats`` rounds: the round with the median samples/s, plus
    every round's samples/s and ratio and the median ratio (each ratio against the baseline of
    its own round, so slow drift of a shared host cancels)."""
    if len(rounds) == 1:
        return rounds[0]
    merged = []
    for i, first in enumerate(rounds[0]):
        runs = [rnd[i] for rnd in rounds]
        ok = [r for r in runs if "samples_per_sec" in r]
        if not ok:
            merged.append(first)
            continue
        ok.sort(key=lambda r: r["samples_per_sec"])
        result = dict(ok[len(ok) // 2])
        result["rounds"] = len(runs)
        result["samples_per_sec_rounds"] = [r.get("samples_per_sec") for r in runs]
        ratios = [r["ratio_vs_baseline"] for r in runs if r.get("ratio_vs_baseline")]
        if ratios:
            result["ratio_vs_baseline_rounds"] = ratios
            result["ratio_vs_baseline"] = statistics.median(ratios)
        merged.append(result)
    return merged


def run_benchmark(
    settings: BenchmarkSettings,
    log: Callable[[str], None] = lambda s: None,
    on_partial: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every (batch size, variant) of ``settings`` plus the baseline per batch size.

    ``on_partial`` receives the report of the runs finished so far after each run (first
    round only), so a caller cut off by a time limit can keep what was measured.

    Returns:
        ``{"meta": {settings, environment, FLOP figures}, "results": [per-run dicts]}``. Each
        result has ``name``, ``kind`` (ours / baseline), ``batch_size``, ``samples_per_sec``,
        ``effective_mfu`` (None on CPU or off 224 px), ``peak_memory_gib``, ``step_ms_mean``,
        ``step_ms_std``, ``ratio_vs_baseline`` (ours only, same batch size), ``losses``, and
        ``profile`` with ``--profile``; a failed run has ``error`` instead of timings.
    """
    if settings.data not in DATA_MODES:
        raise ValueError(f"data must be one of {DATA_MODES}, got {settings.data!r}")
    device = resolve_device(settings.device)
    rounds: list[list[dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="blip-bench-vocab-") as vocab_dir:
        vocab_path = None if settings.model == "blip_pretrain_tiny" else (
            write_bert_layout_vocab(vocab_dir))  # fmt: skip
        for r in range(settings.repeats):
            tag = f"round {r + 1}/{settings.repeats} " if settings.repeats > 1 else ""
            results: list[dict[str, Any]] = []
            for batch_size in settings.batch_sizes:
                baseline = None
                if settings.baseline:
                    log(f"{tag}[b={batch_size}] baseline (transformers-composed) ...")
                    baseline = run_baseline(settings, batch_size, device, vocab_path)
                    results.append(baseline)
                    log(one_line(baseline))
                    if on_partial and r == 0:
                        on_partial(_report(settings, device, [dict(x) for x in results]))
                for variant in settings.variants:
                    log(f"{tag}[b={batch_size}] {variant.name} ...")
                    result = run_recipe_variant(settings, variant, batch_size, device, vocab_path)
                    if baseline and "samples_per_sec" in baseline and "samples_per_sec" in result:
                        result["ratio_vs_baseline"] = (
                            result["samples_per_sec"] / baseline["samples_per_sec"]
                        )
                    results.append(result)
                    log(one_line(result))
                    if on_partial and r == 0:
                        on_partial(_report(settings, device, [dict(x) for x in results]))
            rounds.append(results)
    return _report(settings, device, merge_rounds(rounds))


def _report(
    settings: BenchmarkSettings, device: torch.device, results: list[dict[str, Any]]
) -> dict[str, Any]:
    """``run_benchmark``'s report of ``results``: effective MFU and ratio filled in, and meta."""
    for result in results:
        if "samples_per_sec" in result:
            result["effective_mfu"] = _mfu(settings, result["samples_per_sec"], device)
        result.setdefault("ratio_vs_baseline", None)
    meta = asdict(settings)
    meta["variants"] = [v.name for v in settings.variants]
    meta.update(
        image_size=settings.resolved_image_size(),
        text_length=TEXT_LENGTH,
        flops_per_sample=flops_per_sample(settings.model),
        peak_flops=peak_flops(device),
        environment=environment(device),
        command=" ".join(sys.argv),
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    return {"meta": meta, "results": results}
