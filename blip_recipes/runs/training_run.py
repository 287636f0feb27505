"""What every training recipe sets up first and tears down last, around what it trains.

``TrainingRun(cfg, name, logger).start()`` installs the stop handlers (first: a stop during a long set-up is not
lost), starts the process group, ends set-up when a stop came already, takes the output folder's
lock, opens this rank's log file and sets the CPU threads. The recipe then builds its data,
model, optimizer and step, and calls :meth:`TrainingRun.open_metrics` and
:meth:`TrainingRun.record_start` (``config.toml``, ``run_info.json``, the "setup done" line). In
the loop it calls :meth:`TrainingRun.check_folder` at log and save steps; at the end
:meth:`TrainingRun.log_summary` and :meth:`TrainingRun.close`.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from blip_recipes.config import Config, to_toml
from blip_recipes.config.registry import class_file, recipe_record
from blip_recipes.metrics import MetricsLogger, WandbBackend, require_wandb
from blip_recipes.metrics.run_logging import attach_rank_log_file
from blip_recipes.parallel import init_distributed, shutdown_distributed
from blip_recipes.runs.errors import RunStoppedError
from blip_recipes.runs.info import (
    collect_run_info,
    configure_cpu_threads,
    flat_config,
    gather_hostnames,
    run_summary,
    summary_lines,
    update_run_info,
    write_run_info,
)
from blip_recipes.runs.lock import RunLockedError, acquire_run_lock
from blip_recipes.runs.stop import StopRequests


class TrainingRun:
    """One training run's process group, output folder, lock, stop requests and bookkeeping.

    Attributes: ``cfg``, ``name`` (the recipe's, in messages), ``logger`` (the recipe's: the
    lines logged here carry its name), ``stop`` (:class:`StopRequests`), ``dist`` (the
    process group's ``DistInfo``), ``device``, ``output_dir``, ``cpu_threads``.
    """

    def __init__(self, cfg: Config, name: str, logger: logging.Logger) -> None:
        self.cfg = cfg
        self.name = name
        self.logger = logger
        self.output_dir = Path(cfg.job.output_dir)
        self.run_lock: Any = None
        self.stop = StopRequests()
        self.start_time = time.time()
        self.train_start = (time.perf_counter(), 0)
        """(perf_counter, step) when the loop started: the summary's wall time and steps."""

    def start(self) -> None:
        """Stop handlers -> process group -> stop check -> lock -> rank log -> CPU threads.

        Raises:
            StoppedBeforeStartError: a stop came before training started (exit 0).
            SystemExit(2): the output folder is in use by another run, or metrics.wandb is set
                without wandb installed (one line on stderr).
        """
        cfg, name = self.cfg, self.name
        par = cfg.parallel
        self.stop = StopRequests.install()  # first: a stop during a long set-up is not lost
        self.dist = init_distributed(
            par.device, par.data_parallel, par.dp_replicate, cfg.job.collective_timeout_s
        )
        self.stop.refuse_start_if_requested(self.dist)
        self.device = self.dist.device
        try:  # one run per output folder, decided by rank 0 before anything is written
            self.run_lock = acquire_run_lock(self.output_dir, self.dist.rank, self.dist.world_size)
        except RunLockedError as e:
            print(f"{name}: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        self.start_time = time.time()
        attach_rank_log_file(self.output_dir, self.dist.rank)  # logs/rank<r>.log
        if cfg.metrics.wandb:
            try:  # every rank, before anything is built
                require_wandb()
            except ImportError as e:
                print(f"{name}: {e}", file=sys.stderr)
                raise SystemExit(2) from None
        self.cpu_threads = configure_cpu_threads(self.device.type, cfg.job.cpu_threads)

    @property
    def samples_per_step(self) -> int:
        """Samples per optimizer step over all ranks: batch x world x grad_accum_steps."""
        cfg = self.cfg
        return cfg.data.batch_size * self.dist.world_size * cfg.training.grad_accum_steps

    def open_metrics(self, total_steps: int, resume_step: int | None) -> MetricsLogger:
        """metrics.jsonl (rank 0), TensorBoard and W&B as configured; ``resume_step``: the
        step a resumed run continues from (None: a fresh start)."""
        cfg = self.cfg
        backends = []
        if cfg.metrics.wandb and self.dist.is_main:
            backends.append(
                WandbBackend(
                    cfg.metrics.wandb_project,
                    cfg.metrics.wandb_run_name or cfg.job.name,
                    dir=self.output_dir,
                    config=flat_config(cfg),
                    entity=cfg.metrics.wandb_entity,
                )
            )
        return MetricsLogger(
            self.output_dir,
            rank=self.dist.rank,
            tensorboard=cfg.metrics.tensorboard,
            total_steps=total_steps,
            resume_step=resume_step,
            backends=backends,
        )

    def record_start(
        self,
        recipe: object,
        start_step: int,
        resumed_from: Path | None,
        total_steps: int,
        steps_per_epoch: int,
        compute_dtype: torch.dtype,
    ) -> None:
        """End of set-up (collective: the hostnames): rank 0 writes ``config.toml`` and
        ``run_info.json`` (naming ``recipe``'s file), every rank logs "setup done"."""
        cfg = self.cfg
        hosts = gather_hostnames()
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.toml").write_text(to_toml(cfg))
            info = collect_run_info(
                cfg, self.dist, self.start_time, hosts=hosts, cpu_threads=self.cpu_threads,
                start_step=start_step,
                resumed_from=str(resumed_from) if resumed_from is not None else None,
                recipe=recipe_record(class_file(type(recipe))),  # the file that ran
            )  # fmt: skip
            write_run_info(self.output_dir, info)
        self.logger.info(
            "setup done: %s, %d rank(s) on %s, %s, %d steps (%d per epoch), %s",
            cfg.model.name,
            self.dist.world_size,
            self.device,
            compute_dtype,
            total_steps,
            steps_per_epoch,
            f"resuming from {resumed_from}" if resumed_from else "fresh start",
        )
        self.train_start = (time.perf_counter(), start_step)

    def check_folder(self, step: int) -> None:
        """At log and save steps: stop (exit 1, nothing saved) when the output folder or rank
        0's ``.run.lock`` in it was removed, moved or taken over by another run (rank 0 looks;
        its verdict is broadcast, so every rank stops together).

        Raises:
            RunStoppedError: naming what happened and the step.
        """
        problem = self.run_lock.problem() if self.run_lock is not None else None
        if self.dist.world_size > 1:
            flag = torch.tensor([0 if problem is None else 1], dtype=torch.int32)
            dist.broadcast(flag, src=0, group=self.dist.dp_group)
            if flag.item() and problem is None:
                problem = "rank 0 found the output folder or its lock gone (see its log)"
        if problem is not None:
            raise RunStoppedError(f"{problem}; stopping at step {step} without saving")

    def log_summary(
        self, step: int, metrics: MetricsLogger, checkpoint: Path, best_key: str
    ) -> dict[str, Any] | None:
        """End of run (rank 0): summary lines in the log, ``summary`` in run_info.json, the
        settings with the final metrics as TensorBoard/W&B hparams. ``best_key``: the eval
        record key whose maximum is the best evaluation. Returns the summary (rank 0)."""
        t0, step0 = self.train_start
        if not self.dist.is_main:
            return None
        out = self.output_dir
        summary = run_summary(
            start_step=step0,
            end_step=step,
            wall_seconds=time.perf_counter() - t0,
            samples_per_step=self.samples_per_step,
            last_record=metrics.last_record,
            first_record=getattr(metrics, "first_record", None),
            eval_records=metrics.eval_records,
            best_key=best_key,
            outputs={
                "output_dir": out,
                "checkpoint": checkpoint,
                "metrics": out / "metrics.jsonl",
                "tensorboard": out / "tensorboard" if self.cfg.metrics.tensorboard else None,
                "logs": out / "logs",
            },
            stopped_by=self.stop.reason() if self.stop.requested() else None,
        )
        for line in summary_lines(summary):
            self.logger.info("%s", line)
        update_run_info(out, summary=summary)
        final = {f"final_{k}": v for k, v in summary["last"].items()}
        final["samples_per_sec"] = summary["samples_per_sec"]
        if summary["best_eval"]:
            final.update({f"best_{k}": v for k, v in summary["best_eval"].items() if k != "step"})
        metrics.log_hparams(flat_config(self.cfg), final)
        return summary

    def close(self, barrier: bool = True) -> None:
        """Tear the process group down (``barrier=False`` after a failure: see
        `shutdown_distributed`), then release the output folder for the next run."""
        try:
            shutdown_distributed(barrier)
        finally:
            if self.run_lock is not None:
                self.run_lock.release()


def steps_per_epoch(loader: Any, cfg: Config) -> int:
    """Optimizer steps per epoch: ``training.steps_per_epoch``, else the loader's batches per
    epoch / ``training.grad_accum_steps``.

    Raises:
        ValueError: neither is known (streamed shards without sizes).
    """
    configured = cfg.training.steps_per_epoch
    known = getattr(loader, "steps_per_epoch", None)
    if configured is not None:
        return configured
    if known is None:
        raise ValueError(
            "the data size is unknown (streamed shards without sizes): put a sizes.json "
            "beside the shards, keep img2dataset's *_stats.json files, or set "
            "training.steps_per_epoch"
        )
    return max(known // cfg.training.grad_accum_steps, 1)
