"""BLIP pretraining recipe: ITC (momentum distillation, queues) + ITM (hard negatives) + LM.

    blip run blip_pretrain --config debug
    blip run --nproc-per-node 8 recipes/blip_pretrain.py --config configs/base.toml key=value ...

The recipe owns the loop and reads top to bottom: ``setup`` (distributed -> data -> model and
momentum state built and parallelized by the library's ``build_pretraining`` -> optimizer ->
scheduler -> step -> checkpoint -> metrics), ``train``, ``save_checkpoint``, ``cleanup``.
One step follows the data: loader -> device -> the library's ``PretrainStep`` (EMA + momentum
targets -> losses -> backward -> gradient norm -> one flag agreed by all ranks -> optimizer ->
enqueue) -> metrics -> checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from blip_recipes.checkpoint import (
    LOADER,
    LR_SCHEDULER,
    MODEL,
    MOMENTUM,
    OPTIMIZER,
    TRAIN_STATE,
    CheckpointCorruptError,
    CheckpointManager,
    CheckpointWriteError,
    ModelWrapper,
    NonFiniteCheckpointError,
    OptimizerWrapper,
    PerRankState,
    TrainState,
    is_complete,
    load_states,
    top_level_keys,
)
from blip_recipes.cli.dispatch import STOP_REQUEST_ENV
from blip_recipes.config import Config, parse_recipe_args, to_toml
from blip_recipes.config.registry import class_file, recipe_record
from blip_recipes.data import TrainLoader, build_tokenizer, build_train_loader, normalize_images
from blip_recipes.data.nodes import STOP_SIGNALS
from blip_recipes.data.watchdog import LoaderError
from blip_recipes.evaluation.periodic import PeriodicEvaluator
from blip_recipes.metrics import (
    MetricsLogger,
    MetricsWriteError,
    WandbBackend,
    effective_mfu,
    flops_per_sample,
    max_memory_gib,
    peak_flops,
    require_wandb,
)
from blip_recipes.metrics.run_logging import attach_rank_log_file, configure_logging
from blip_recipes.parallel import init_distributed, shutdown_distributed
from blip_recipes.parallel.compile import FirstCallTimer
from blip_recipes.parallel.distributed import is_collective_timeout
from blip_recipes.runs.errors import RunStoppedError, exit_status_for_error
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
from blip_recipes.training.build import build_pretraining, compute_dtype, set_determinism
from blip_recipes.training.momentum import check_queue_batch
from blip_recipes.training.optim import alpha_at_step, build_lr_scheduler, build_optimizer
from blip_recipes.training.pretrain import PretrainStep
from blip_recipes.training.step import DeviceBatch, StepResult

logger = logging.getLogger("blip_pretrain")


class NonFiniteLossError(RunStoppedError):
    """Too many consecutive steps produced a non-finite loss."""


class StoppedBeforeStartError(Exception):
    """A stop signal arrived before training started: nothing to save, exit 0."""


class _NonFiniteRun:
    """Consecutive skipped steps (``ok`` False), counted on the device and checked every step
    without waiting for the device.

    On CPU the count is read directly (no device to wait for). On CUDA each step's count is
    copied into pinned host memory without blocking and read once the device has finished that
    step (a CUDA event, polled): the run stops at the limit as soon as the device gets there,
    typically a step or two after the host queued it, and the host never waits. Log steps read
    it exactly (they synchronise anyway).
    """

    def __init__(self, device: torch.device, limit: int) -> None:
        self.limit = limit
        self.count = torch.zeros((), dtype=torch.long, device=device)
        self._cuda = device.type == "cuda"
        self._host = torch.zeros((), dtype=torch.long, pin_memory=self._cuda)
        self._event: Any = None

    def update(self, ok: torch.Tensor) -> None:
        """Add one step: ``ok`` is the step's 0-d bool flag agreed by every rank."""
        self.count = (self.count + 1) * (~ok)
        if self._cuda and self._event is None:  # else the previous copy is still on its way
            self._host.copy_(self.count, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def reached(self, exact: bool = False) -> int | None:
        """The count when it reached the limit, else None. ``exact``: read the current count
        (a device sync on CUDA; free at log steps)."""
        if not self._cuda or exact:
            count = int(self.count)
        elif self._event is not None and self._event.query():
            count, self._event = int(self._host), None
        else:
            return None
        return count if count >= self.limit else None


class _Window:
    """Device-side sums of the step outputs between two log steps (no host sync until read)."""

    KEYS = ("loss", "loss_ita", "loss_itm", "loss_lm", "itm_acc", "itm_pos_prob", "itm_neg_prob")

    def __init__(self, device: torch.device, keys: tuple[str, ...] = KEYS) -> None:
        self.keys = keys
        self.start = time.perf_counter()
        self.steps = 0
        self.data_wait = 0.0
        self.sums = torch.zeros(len(keys), device=device)
        self.applied = torch.zeros((), device=device)

    def add(self, result: StepResult) -> None:
        values = torch.stack([getattr(result.output, k).detach().float() for k in self.keys])
        self.sums += torch.where(result.ok, values, torch.zeros_like(values))
        self.applied += result.ok
        self.steps += 1

    def means(self) -> dict[str, float]:
        """Means over the applied steps; NaN when every step of the window was skipped."""
        if int(self.applied) == 0:
            return dict.fromkeys(self.keys, float("nan"))
        return dict(zip(self.keys, (self.sums / self.applied).tolist()))

    def skipped(self) -> int:
        return self.steps - int(self.applied)


class BlipPretrainRecipe:
    """Pretrain a BLIP model. See the module docstring for the order of things.

    Other recipes (retrieval and caption fine-tuning) subclass it and override the set-up hooks
    (`_build_loader`, `_build_model_and_momentum`, `_build_lr_scheduler`, `_build_step`,
    `_build_evaluator`), `_to_device`, `train_step`, `_checkpoint_states`, `METRIC_KEYS`,
    `_step_log_fields`, `BEST_EVAL_KEY` and `_flops_per_sample`.
    """

    METRIC_KEYS: tuple[str, ...] = _Window.KEYS
    """Step outputs averaged over each log window into metrics.jsonl."""

    BEST_EVAL_KEY = "r_mean"
    """Eval-record key whose maximum the end-of-run summary reports as the best evaluation."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.step = 0
        self.nonfinite_steps = 0
        self._stop_signal: int | None = None
        self._launcher_pid: int | None = None

    @classmethod
    def run(cls, argv: list[str] | None, description: str) -> int:
        """The recipe's command line: config from ``argv`` -> setup -> train -> cleanup.

        Returns the exit status: 0, or 1 when the run diverged (too many non-finite steps, or a
        checkpoint that would hold NaN/Inf) or its data failed (a loader worker died, no batch
        within data.timeout_s, too many bad samples), said in one line without a traceback.
        """
        cfg = parse_recipe_args(argv, description=description)
        configure_logging()  # rank 0 on the console; every rank in <output_dir>/logs/rank<r>.log
        recipe = cls(cfg)
        healthy = True  # False after a failed collective: no barrier at shutdown
        try:
            recipe.setup()
            recipe.train()
        except StoppedBeforeStartError as e:
            logger.warning("%s", e)
            return 0
        except (NonFiniteLossError, NonFiniteCheckpointError, CheckpointWriteError,
                CheckpointCorruptError, MetricsWriteError, LoaderError) as e:  # fmt: skip
            logger.error("%s", e)
            return 1
        except Exception as e:  # one line on the console, the traceback in the rank log
            healthy = not is_collective_timeout(e)
            source = getattr(sys.modules.get(cls.__module__), "__file__", None) or logger.name
            return exit_status_for_error(e, Path(source).stem, logger)
        finally:
            recipe.cleanup(barrier=healthy)
        return 0

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        par = cfg.parallel
        self._install_signal_handlers()  # first: a stop during a long set-up is not lost
        self.dist = init_distributed(
            par.device, par.data_parallel, par.dp_replicate, cfg.job.collective_timeout_s
        )
        self._stop_if_requested_before_start()
        self.device = self.dist.device
        self.output_dir = Path(cfg.job.output_dir)
        try:  # one run per output folder, decided by rank 0 before anything is written
            self.run_lock = acquire_run_lock(self.output_dir, self.dist.rank, self.dist.world_size)
        except RunLockedError as e:
            print(f"blip_pretrain: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        start_time = time.time()
        attach_rank_log_file(self.output_dir, self.dist.rank)  # logs/rank<r>.log
        if cfg.metrics.wandb:
            try:  # every rank, before anything is built
                require_wandb()
            except ImportError as e:
                print(f"blip_pretrain: {e}", file=sys.stderr)
                raise SystemExit(2) from None
        self.cpu_threads = configure_cpu_threads(self.device.type, cfg.job.cpu_threads)
        check_queue_batch(cfg.momentum.queue_size, cfg.data.batch_size, self.dist.world_size)
        self.checkpointer = CheckpointManager(
            self.output_dir / "checkpoints",
            keep_latest_k=cfg.checkpoint.keep_latest_k,
            async_save=cfg.checkpoint.async_save,
        )
        self.resume_from = self._resume_path()
        torch.manual_seed(cfg.job.seed)
        set_determinism(cfg.training.deterministic)
        self.compute_dtype = compute_dtype(cfg.training.mixed_precision, self.device)

        self.tokenizer = build_tokenizer(cfg.tokenizer)
        self.loader = self._build_loader()
        self.loader.stop_requested = lambda: self._stop_signal is not None  # a stuck wait ends
        self.steps_per_epoch = self._steps_per_epoch()
        self.total_steps = cfg.training.steps or cfg.training.epochs * self.steps_per_epoch

        self._build_model_and_momentum()
        self._stop_if_requested_before_start()  # before metrics.jsonl is touched
        self.optimizer = build_optimizer(self.model, cfg.optimizer, self.device.type)
        self.lr_scheduler = self._build_lr_scheduler()
        self.train_state = TrainState()
        self.step_fn = self._build_step()
        if cfg.parallel.compile:  # the first step compiles: say so, and how long it took
            self.step_fn = FirstCallTimer(self.step_fn, "first step")
        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from)
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
        self.metrics = MetricsLogger(
            self.output_dir,
            rank=self.dist.rank,
            tensorboard=cfg.metrics.tensorboard,
            total_steps=self.total_steps,
            resume_step=self.step if self.resume_from is not None else None,
            backends=backends,
        )
        self.loader.open_bad_sample_log(  # every rank names its bad samples there
            self.output_dir,
            resume_step=self.step if self.resume_from is not None else None,
            batches_per_step=cfg.training.grad_accum_steps,
        )
        self.evaluator = self._build_evaluator()
        hosts = gather_hostnames()  # collective
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.toml").write_text(to_toml(cfg))
            info = collect_run_info(
                cfg, self.dist, start_time, hosts=hosts, cpu_threads=self.cpu_threads,
                start_step=self.step,
                resumed_from=str(self.resume_from) if self.resume_from is not None else None,
                recipe=recipe_record(class_file(type(self))),  # the file that ran
            )  # fmt: skip
            write_run_info(self.output_dir, info)
        logger.info(
            "setup done: %s, %d rank(s) on %s, %s, %d steps (%d per epoch), %s",
            cfg.model.name,
            self.dist.world_size,
            self.device,
            self.compute_dtype,
            self.total_steps,
            self.steps_per_epoch,
            f"resuming from {self.resume_from}" if self.resume_from else "fresh start",
        )
        self._train_start = (time.perf_counter(), self.step)

    def _resume_path(self) -> Path | None:
        resume = self.cfg.checkpoint.resume
        if resume == "auto":  # newest that verifies; damaged newer ones are moved aside
            return self.checkpointer.latest_intact(quarantine=True)
        existing = self.checkpointer.latest_complete()
        if resume == "none":
            if existing is not None:
                raise FileExistsError(
                    f"{self.output_dir} already holds checkpoint {existing.name}; set "
                    "checkpoint.resume=auto to continue it or choose another job.output_dir "
                    "(checkpoints are never overwritten)"
                )
            return None
        path = Path(resume)
        if not is_complete(path):
            raise FileNotFoundError(
                f"checkpoint.resume={resume!r}: not a complete checkpoint folder (no DCP metadata)"
            )
        self.checkpointer.check_intact(path)
        return path

    def _steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: the loader's batches per epoch / grad_accum_steps."""
        configured = self.cfg.training.steps_per_epoch
        known = getattr(self.loader, "steps_per_epoch", None)
        if configured is not None:
            return configured
        if known is None:
            raise ValueError(
                "the data size is unknown (streamed shards without sizes): put a sizes.json "
                "beside the shards, keep img2dataset's *_stats.json files, or set "
                "training.steps_per_epoch"
            )
        return max(known // self.cfg.training.grad_accum_steps, 1)

    def _build_loader(self) -> Any:
        """This rank's training loader (captions tokenized with `self.tokenizer`)."""
        cfg = self.cfg
        return build_train_loader(
            cfg.data,
            self.tokenizer,
            image_size=cfg.model.image_size,
            seed=cfg.job.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )

    def _build_model_and_momentum(self) -> None:
        """Model on meta -> parallel plan -> weights -> momentum state (library set-up), then
        reference momentum weights and queues from `checkpoint.init_from` when it has them."""
        self.model, self.momentum, self.plan = build_pretraining(
            self.cfg, self.tokenizer, self.dist, self.compute_dtype
        )
        init_from = self.cfg.checkpoint.init_from
        if init_from and self.resume_from is None and MOMENTUM in top_level_keys(init_from):
            load_states(init_from, {MOMENTUM: self.momentum})
            logger.info("momentum encoders and queues initialised from %s", init_from)

    def _build_lr_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        """The `[lr_scheduler]` schedule over the optimizer."""
        return build_lr_scheduler(
            self.optimizer,
            self.cfg.lr_scheduler,
            peak_lr=self.cfg.optimizer.lr,
            steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps,
        )

    def _build_step(self) -> PretrainStep:
        """The library's optimizer step for this run's config."""
        return PretrainStep.from_config(
            self.cfg, self.model, self.optimizer, self.lr_scheduler, self.dist,
            self.compute_dtype, momentum=self.momentum,
        )  # fmt: skip

    def _build_evaluator(self) -> Any:
        """What `train` calls as `evaluator.maybe_run(step, model)` after every step."""
        cfg = self.cfg
        return PeriodicEvaluator(
            cfg.eval, self.tokenizer, self.metrics, cfg.model.image_size, cfg.data.max_words
        )

    def _flops_per_sample(self) -> float | None:
        """FLOPs of one training sample for MFU (None: not tabulated, MFU logged as null)."""
        return flops_per_sample(self.cfg.model.name)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_states(self) -> dict[str, Any]:
        self.train_state.step = self.step
        self.train_state.epoch = self.step // self.steps_per_epoch
        self.train_state.samples_seen = self.step * self._global_batch()
        return {
            MODEL: ModelWrapper(self.model),
            OPTIMIZER: OptimizerWrapper(self.model, self.optimizer),
            LR_SCHEDULER: self.lr_scheduler,
            MOMENTUM: self.momentum,
            TRAIN_STATE: self.train_state,
            LOADER: self._loader_state(),
        }

    def _loader_state(self) -> Any:
        """Map-style loaders keep a global position, identical on every rank (so it also
        resumes on another world size); streamed shards keep per-rank stream states."""
        return self.loader if isinstance(self.loader, TrainLoader) else PerRankState(self.loader)

    def _load_checkpoint(self, path: Path) -> None:
        if self.cfg.checkpoint.resume == "auto":  # one that cannot be read: the next older one
            path = self.checkpointer.load_readable(path, self._checkpoint_states(), quarantine=True)
            self.resume_from = path
        else:
            self.checkpointer.load(path, self._checkpoint_states())
        self.step = self.train_state.step
        logger.info("resumed from %s at step %d", path, self.step)

    def save_checkpoint(self) -> None:
        """Save everything a bitwise resume needs into checkpoints/step-N/."""
        self.checkpointer.save(
            self.step, self._checkpoint_states(), extra_files={"config.toml": to_toml(self.cfg)}
        )

    # ------------------------------------------------------------------ training
    def alpha(self, step: int) -> float:
        """Distillation weight: linear from 0 to `momentum.alpha` over the first ramp epochs."""
        m = self.cfg.momentum
        return alpha_at_step(step, m.alpha, m.alpha_ramp_epochs * self.steps_per_epoch)

    def _global_batch(self) -> int:
        """Samples per optimizer step over all ranks: batch x world x grad_accum_steps."""
        cfg = self.cfg
        return cfg.data.batch_size * self.dist.world_size * cfg.training.grad_accum_steps

    def _to_device(self, batch: dict[str, torch.Tensor]) -> DeviceBatch:
        return DeviceBatch(
            normalize_images(batch["images"].to(self.device, non_blocking=True)),
            batch["input_ids"].to(self.device, non_blocking=True),
            batch["attention_mask"].to(self.device, non_blocking=True),
        )

    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> StepResult:
        """One optimizer step on `grad_accum_steps` loader batches (see `PretrainStep`)."""
        micro_batches = [self._to_device(batch) for batch in batches]
        return self.step_fn(micro_batches, self.step, self.alpha(self.step))

    def train(self) -> None:
        """Step until `training.steps` (or `epochs`), a stop signal, or too many bad steps."""
        cfg = self.cfg
        window = _Window(self.device, self.METRIC_KEYS)
        nonfinite_run = _NonFiniteRun(self.device, cfg.training.max_nonfinite_steps)
        while self.step < self.total_steps:
            if self.step % cfg.checkpoint.signal_check_every == 0 and self._agreed_stop():
                logger.warning(
                    "%s: saving a checkpoint at step %d, then exiting", self._stop_reason(),
                    self.step,
                )  # fmt: skip
                break
            t0 = time.perf_counter()
            batches = [next(self.loader) for _ in range(cfg.training.grad_accum_steps)]
            window.data_wait += time.perf_counter() - t0
            result = self.train_step(batches)
            self.step += 1
            nonfinite_run.update(result.ok)
            window.add(result)
            last = self.step == self.total_steps
            log_step = self.step % cfg.metrics.log_every == 0 or last
            if log_step:
                self._check_run_folder()
                self._log(window, result)
                window = _Window(self.device, self.METRIC_KEYS)
            bad_run = nonfinite_run.reached(exact=log_step)
            if bad_run is not None:
                raise NonFiniteLossError(
                    f"{bad_run} consecutive steps had a non-finite loss or gradient norm (limit "
                    f"training.max_nonfinite_steps={cfg.training.max_nonfinite_steps}), up to "
                    f"step {self.step}; each skipped its update. "
                    f"Newest checkpoint: {self.checkpointer.latest_complete()}"
                )
            self.evaluator.maybe_run(self.step, self.model)
            if self.step % cfg.checkpoint.interval == 0 and not last:
                self._check_run_folder()
                self.save_checkpoint()
        self._check_run_folder()
        self.save_checkpoint()
        self._summarize()

    def _summarize(self) -> None:
        """End of run (rank 0): summary lines in the log, ``summary`` in run_info.json, the
        settings with the final metrics as TensorBoard/W&B hparams."""
        t0, step0 = getattr(self, "_train_start", (time.perf_counter(), self.step))
        if not self.dist.is_main:
            return
        summary = run_summary(
            start_step=step0,
            end_step=self.step,
            wall_seconds=time.perf_counter() - t0,
            samples_per_step=self._global_batch(),
            last_record=self.metrics.last_record,
            first_record=getattr(self.metrics, "first_record", None),
            eval_records=self.metrics.eval_records,
            best_key=self.BEST_EVAL_KEY,
            outputs={
                "output_dir": self.output_dir,
                "checkpoint": self.checkpointer.step_dir(self.step),
                "metrics": self.output_dir / "metrics.jsonl",
                "tensorboard": self.output_dir / "tensorboard" if self.cfg.metrics.tensorboard
                else None,
                "logs": self.output_dir / "logs",
            },
            stopped_by=None if self._stop_signal is None else self._stop_reason(),
        )  # fmt: skip
        for line in summary_lines(summary):
            logger.info("%s", line)
        update_run_info(self.output_dir, summary=summary)
        final = {f"final_{k}": v for k, v in summary["last"].items()}
        final["samples_per_sec"] = summary["samples_per_sec"]
        if summary["best_eval"]:
            final.update({f"best_{k}": v for k, v in summary["best_eval"].items() if k != "step"})
        self.metrics.log_hparams(flat_config(self.cfg), final)

    def _log(self, window: _Window, result: StepResult) -> None:
        """Host sync point: turn the window's device sums into one metrics record."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        record = window.means()
        self.nonfinite_steps += window.skipped()
        elapsed = time.perf_counter() - window.start
        samples_per_sec = self._global_batch() * window.steps / elapsed
        record.update(
            lr=self.optimizer.param_groups[0]["lr"],
            **self._step_log_fields(result),
            grad_norm=result.grad_norm.item(),
            samples_per_sec=samples_per_sec,
            mfu=effective_mfu(
                samples_per_sec / self.dist.world_size,
                self._flops_per_sample(),
                peak_flops(self.device),
            ),
            max_memory_gib=max_memory_gib(self.device),
            data_wait_frac=window.data_wait / elapsed,
            bad_samples=self.loader.stats().get("bad_samples", 0),
            nonfinite_steps=self.nonfinite_steps,
            epoch=self.step // self.steps_per_epoch,
        )
        self.metrics.log(self.step, record)

    def _step_log_fields(self, result: StepResult) -> dict[str, Any]:
        """Recipe-specific fields of a metrics record (pretraining: alpha and temperature)."""
        return {"alpha": self.alpha(self.step - 1), "temp": result.output.temp.item()}

    # ------------------------------------------------------------------ signals and cleanup
    def _install_signal_handlers(self) -> None:
        """SIGTERM, SIGINT and SIGUSR1 ask for a stop: the step loop saves a checkpoint at its next
        stop check and ends; a second SIGINT on this rank raises KeyboardInterrupt (stop now).

        Slurm signals every process of the job, torchrun each rank's process group, `blip run`'s
        launcher forwards the first signal it gets: a rank usually hears of a stop once or
        twice, and its loader workers ignore all three. A stop the launcher got before this rank
        started (a restarted worker group) arrives as ``STOP_REQUEST_ENV``. Under a launcher
        (``RANK`` in the environment) the parent process is remembered: if it is gone at a stop
        check (the launcher was SIGKILLed, so nothing will forward a signal or reap this rank),
        that counts as a stop request too.
        """
        received: list[int] = []

        def request_stop(signum, _frame):
            if received and signum == signal.SIGINT:
                raise KeyboardInterrupt
            received.append(signum)
            if self._stop_signal is None:
                self._stop_signal = signum

        for sig in STOP_SIGNALS:
            signal.signal(sig, request_stop)
        inherited = os.environ.get(STOP_REQUEST_ENV, "")
        if inherited.isdigit() and self._stop_signal is None:
            self._stop_signal = int(inherited)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            self._launcher_pid = os.getppid()

    def _stop_if_requested_before_start(self) -> None:
        """End set-up without saving when a stop signal came before training started (every
        rank agrees, so none is left waiting for the others)."""
        if self._agreed_stop():
            raise StoppedBeforeStartError(
                f"{self._stop_reason()}: stopped before training started, nothing to save"
            )

    def _check_run_folder(self) -> None:
        """At log and save steps: stop (exit 1, nothing saved) when the output folder or rank
        0's `.run.lock` in it was removed, moved or taken over by another run (rank 0 looks;
        its verdict is broadcast, so every rank stops together)."""
        problem = self.run_lock.problem() if getattr(self, "run_lock", None) else None
        if self.dist.world_size > 1:
            flag = torch.tensor([0 if problem is None else 1], dtype=torch.int32)
            dist.broadcast(flag, src=0, group=self.dist.dp_group)
            if flag.item() and problem is None:
                problem = "rank 0 found the output folder or its lock gone (see its log)"
        if problem is not None:
            raise RunStoppedError(f"{problem}; stopping at step {self.step} without saving")

    def _launcher_gone(self) -> bool:
        """True when this rank's launcher (its parent at start-up) is no longer its parent."""
        return self._launcher_pid is not None and os.getppid() != self._launcher_pid

    def _stop_reason(self) -> str:
        """Why the run stops, in words (logs and the end-of-run summary)."""
        if self._stop_signal == -1:
            return "stop requested on another rank"
        if self._stop_signal == signal.SIGHUP and self._launcher_gone():
            return f"launcher (pid {self._launcher_pid}) is gone"
        try:
            return signal.Signals(self._stop_signal).name
        except ValueError:
            return f"signal {self._stop_signal}"

    def _agreed_stop(self) -> bool:
        """True on every rank once any rank got a stop signal (SIGTERM, SIGINT, SIGUSR1) or lost
        its launcher: a CPU MAX all-reduce over the data-parallel group, every
        `checkpoint.signal_check_every` steps (no GPU sync)."""
        if self._stop_signal is None and self._launcher_gone():
            self._stop_signal = int(signal.SIGHUP)  # the launcher hung up
        flag = torch.tensor([1 if self._stop_signal is not None else 0])
        if self.dist.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.dist.dp_group)
        if flag.item() and self._stop_signal is None:
            self._stop_signal = -1
        return bool(flag.item())

    def cleanup(self, barrier: bool = True) -> None:
        """Flush metrics, finish pending saves, release modules, tear the process group down
        (``barrier=False`` after a failed collective: see `shutdown_distributed`)."""
        for name in ("metrics", "checkpointer", "best"):  # best: a fine-tuning recipe's BestWeights
            obj = getattr(self, name, None)
            if obj is not None:
                obj.close()
        if hasattr(self, "loader"):
            self.loader.close_bad_sample_log()
        for name in ("step_fn", "evaluator", "model", "momentum", "optimizer", "lr_scheduler",
                     "loader", "checkpointer", "best", "plan", "dist"):  # fmt: skip
            if hasattr(self, name):
                delattr(self, name)
        try:
            shutdown_distributed(barrier)
        finally:  # the output folder is free for the next run
            if getattr(self, "run_lock", None) is not None:
                self.run_lock.release()


def main(argv: list[str] | None = None) -> int:
    return BlipPretrainRecipe.run(argv, __doc__ or "")


if __name__ == "__main__":
    sys.exit(main())
