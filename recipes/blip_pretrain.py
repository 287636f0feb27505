"""BLIP pretraining recipe: ITC (momentum distillation, queues) + ITM (hard negatives) + LM.

    blip run blip_pretrain --config debug
    blip run --nproc-per-node 8 recipes/blip_pretrain.py --config configs/base.toml key=value ...

The recipe owns the loop and reads top to bottom: ``setup`` (distributed -> data -> model on meta
-> float8 -> activation checkpointing -> compile -> FSDP2 -> weights -> momentum state ->
optimizer -> scheduler -> checkpoint -> metrics), ``train``, ``save_checkpoint``, ``cleanup``.
One step follows the data: loader -> device -> EMA + momentum targets -> losses -> backward ->
optimizer -> enqueue -> metrics -> checkpoint.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from blip_recipes.checkpoint import (
    LOADER,
    LR_SCHEDULER,
    MODEL,
    MOMENTUM,
    OPTIMIZER,
    TRAIN_STATE,
    CheckpointManager,
    ModelWrapper,
    OptimizerWrapper,
    PerRankState,
    TrainState,
    is_complete,
    load_model_weights,
    load_states,
    top_level_keys,
)
from blip_recipes.config import Config, parse_recipe_args, to_toml
from blip_recipes.data import TrainLoader, build_tokenizer, build_train_loader, normalize_images
from blip_recipes.data._seeding import derive_seed
from blip_recipes.evaluation.periodic import PeriodicEvaluator
from blip_recipes.interop.init_checkpoints import bert_init_state_dict, vit_init_state_dict
from blip_recipes.metrics import (
    MetricsLogger,
    effective_mfu,
    flops_per_sample,
    max_memory_gib,
    peak_flops,
)
from blip_recipes.models import build_model, build_momentum_encoders
from blip_recipes.momentum import MomentumState, check_queue_batch
from blip_recipes.optim import build_lr_scheduler, build_optimizer
from blip_recipes.parallel import (
    apply_activation_checkpointing,
    apply_compile,
    apply_float8,
    apply_fsdp,
    float8_precompute_scales,
    init_distributed,
    shutdown_distributed,
)
from blip_recipes.parallel.data_parallel import all_reduce_gradients

logger = logging.getLogger("blip_pretrain")

#: Linears that stay in high precision under float8: the small heads (the LM projection is the
#: tied word-embedding matrix, not an nn.Linear, and is never converted).
FLOAT8_SKIP = ("vision_proj", "text_proj", "itm_head", "lm_head")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps produced a non-finite loss."""


class _Window:
    """Device-side sums of the step outputs between two log steps (no host sync until read)."""

    KEYS = ("loss", "loss_ita", "loss_itm", "loss_lm", "itm_acc", "itm_pos_prob", "itm_neg_prob")

    def __init__(self, device: torch.device) -> None:
        self.start = time.perf_counter()
        self.steps = 0
        self.data_wait = 0.0
        self.sums = torch.zeros(len(self.KEYS), device=device)
        self.applied = torch.zeros((), device=device)

    def add(self, out: Any, finite: torch.Tensor) -> None:
        values = torch.stack([getattr(out, k).detach().float() for k in self.KEYS])
        self.sums += torch.where(finite, values, torch.zeros_like(values))
        self.applied += finite
        self.steps += 1

    def means(self) -> dict[str, float]:
        sums = (self.sums / self.applied.clamp(min=1)).tolist()
        return dict(zip(self.KEYS, sums))

    def skipped(self) -> int:
        return self.steps - int(self.applied)


class BlipPretrainRecipe:
    """Pretrain a BLIP model. See the module docstring for the order of things."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.step = 0
        self.nonfinite_steps = 0
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.dist = init_distributed(cfg.parallel.device)
        self.device = self.dist.device
        self.output_dir = Path(cfg.job.output_dir)
        check_queue_batch(cfg.model.queue_size, cfg.data.batch_size, self.dist.world_size)
        self.checkpointer = CheckpointManager(
            self.output_dir / "checkpoints",
            keep_latest_k=cfg.checkpoint.keep_latest_k,
            async_save=cfg.checkpoint.async_save,
        )
        self.resume_from = self._resume_path()
        torch.manual_seed(cfg.job.seed)
        self.compute_dtype = self._compute_dtype()
        # Like TorchTitan: sharding over one rank only adds hook overhead (1.3-2x on CPU).
        self.use_fsdp = cfg.parallel.fsdp and self.dist.world_size > 1

        self.tokenizer = build_tokenizer(cfg.tokenizer)
        self.loader = build_train_loader(
            cfg.data,
            self.tokenizer,
            image_size=cfg.model.image_size,
            seed=cfg.job.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.steps_per_epoch = self._steps_per_epoch()
        self.total_steps = cfg.training.steps or cfg.training.epochs * self.steps_per_epoch

        self.model = self._build_parallel_model()
        self.momentum = self._build_momentum_state()
        self.optimizer = build_optimizer(self.model, cfg.optimizer, self.device.type)
        self.lr_scheduler = build_lr_scheduler(
            self.optimizer,
            cfg.lr_scheduler,
            peak_lr=cfg.optimizer.lr,
            steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps,
        )
        self.train_state = TrainState()
        self.negatives_generator = torch.Generator(device=self.device)
        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from)
        self.metrics = MetricsLogger(
            self.output_dir,
            rank=self.dist.rank,
            tensorboard=cfg.metrics.tensorboard,
            total_steps=self.total_steps,
            resume_step=self.step if self.resume_from is not None else None,
        )
        self.evaluator = PeriodicEvaluator(
            cfg.eval, self.tokenizer, self.metrics, cfg.model.image_size, cfg.data.max_words
        )
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.toml").write_text(to_toml(cfg))
        self._install_signal_handlers()
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

    def _resume_path(self) -> Path | None:
        resume = self.cfg.checkpoint.resume
        if resume == "auto":
            return self.checkpointer.latest_complete()
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
        return path

    def _compute_dtype(self) -> torch.dtype:
        choice = self.cfg.training.mixed_precision
        if choice == "auto":
            choice = "bf16" if self.device.type == "cuda" else "fp32"
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return torch.bfloat16 if choice == "bf16" else torch.float32

    def _steps_per_epoch(self) -> int:
        configured = self.cfg.training.steps_per_epoch
        known = getattr(self.loader, "steps_per_epoch", None)
        if configured is not None:
            return configured
        if known is None:
            raise ValueError(
                "the data size is unknown (streamed shards): set training.steps_per_epoch"
            )
        return known

    def _model_kwargs(self) -> dict[str, Any]:
        cfg, tok = self.cfg.model, self.tokenizer
        kwargs: dict[str, Any] = dict(
            vocab_size=tok.vocab_size,
            image_size=cfg.image_size,
            embed_dim=cfg.embed_dim,
            queue_size=cfg.queue_size,
            pad_token_id=tok.pad_token_id,
            enc_token_id=tok.enc_token_id,
            dec_token_id=tok.dec_token_id,
            share_cross_attention_kv=cfg.share_cross_attention_kv,
        )
        if cfg.drop_path_rate is not None:
            kwargs["drop_path_rate"] = cfg.drop_path_rate
        return kwargs

    def _build_parallel_model(self) -> torch.nn.Module:
        """Model on meta -> float8 -> AC -> compile -> FSDP2 -> materialise -> init or load."""
        cfg, par = self.cfg, self.cfg.parallel
        with torch.device("meta"):
            model = build_model(cfg.model.name, **self._model_kwargs())
        vit_blocks = list(model.visual_encoder.blocks)
        text_layers = list(model.text.layers)
        if par.float8:
            converted = apply_float8(
                model,
                recipe=par.float8_recipe,
                emulate=par.float8_emulate,
                fsdp_all_gather=par.float8_fsdp_all_gather and self.use_fsdp,
                skip_fqns=FLOAT8_SKIP,
            )
            logger.info("float8: %d linears converted", len(converted))
        if par.activation_checkpointing == "full":
            apply_activation_checkpointing(vit_blocks + text_layers)
        elif par.activation_checkpointing == "vit_last_n":
            apply_activation_checkpointing(vit_blocks[-par.ac_vit_layers :])
        if par.compile:
            apply_compile(vit_blocks + text_layers)
        if self.use_fsdp:
            apply_fsdp(
                model,
                vit_blocks + text_layers,
                self.dist.mesh,
                param_dtype=self.compute_dtype,
                reshard_after_forward=par.reshard_after_forward,
            )
        model.to_empty(device=self.device)
        self._load_full_weights(model, self._initial_weights())
        return model

    def _initial_weights(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) initial weights, identical on every rank and for any sharding.

        Built on the CPU from the run seed, then overwritten by `checkpoint.init_from` or by
        `model.text_init` / `model.vision_init` when given.
        """
        torch.manual_seed(self.cfg.job.seed)
        reference = build_model(self.cfg.model.name, **self._model_kwargs())
        reference.init_weights()
        self._load_pretrained_parts(reference)
        if self.cfg.checkpoint.init_from:
            load_model_weights(self.cfg.checkpoint.init_from, reference)
        return reference.state_dict()

    def _load_pretrained_parts(self, model: torch.nn.Module) -> None:
        """`model.text_init` (BERT) and `model.vision_init` (DeiT/timm ViT), from local files."""
        cfg = self.cfg.model
        parts = []
        if cfg.text_init:
            parts.append(("model.text_init", cfg.text_init,
                          lambda src: bert_init_state_dict(src, self.tokenizer.vocab_size,
                                                           seed=self.cfg.job.seed)))  # fmt: skip
        if cfg.vision_init:
            parts.append(("model.vision_init", cfg.vision_init,
                          lambda src: vit_init_state_dict(src, cfg.image_size)))  # fmt: skip
        for key, source, convert in parts:
            if not Path(source).exists():
                raise FileNotFoundError(
                    f"{key}={source!r} does not exist; point it at a local file or remove it "
                    "(nothing is downloaded)"
                )
            state = convert(source)
            result = model.load_state_dict(state, strict=False)
            if result.unexpected_keys or not state:
                raise ValueError(
                    f"{key}={source!r}: weights do not fit the model (unexpected keys: "
                    f"{result.unexpected_keys[:5]})"
                )
            logger.info("%s: loaded %d tensors from %s", key, len(state), source)

    @staticmethod
    def _load_full_weights(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        set_model_state_dict(
            module, state, options=StateDictOptions(full_state_dict=True, strict=True)
        )

    def _build_momentum_state(self) -> MomentumState:
        cfg, par = self.cfg, self.cfg.parallel
        with torch.device("meta"):
            encoders = build_momentum_encoders(cfg.model.name, **self._model_kwargs())
        momentum = MomentumState(
            encoders,
            queue_size=cfg.model.queue_size,
            embed_dim=cfg.model.embed_dim,
            momentum=cfg.model.momentum,
            train_mode=cfg.model.momentum_train_mode,
            seed=cfg.job.seed,
            device=self.device,
        )
        encoders = momentum.encoders
        blocks = list(encoders.visual_encoder.blocks) + list(encoders.text_encoder.layers)
        if par.compile:
            apply_compile(blocks)
        if self.use_fsdp:
            apply_fsdp(
                encoders,
                blocks,
                self.dist.mesh,
                param_dtype=self.compute_dtype,
                reshard_after_forward=True,
            )
        encoders.to_empty(device=self.device)
        for p in encoders.parameters():
            p.requires_grad_(False)
        momentum.copy_from(self.model)
        init_from = self.cfg.checkpoint.init_from
        if init_from and self.resume_from is None and MOMENTUM in top_level_keys(init_from):
            load_states(init_from, {MOMENTUM: momentum})  # reference momentum weights + queues
            logger.info("momentum encoders and queues initialised from %s", init_from)
        return momentum

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_states(self) -> dict[str, Any]:
        self.train_state.step = self.step
        self.train_state.epoch = self.step // self.steps_per_epoch
        self.train_state.samples_seen = self.step * self.cfg.data.batch_size * self.dist.world_size
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
        """Distillation weight: linear from 0 to `training.alpha` over the first ramp epochs."""
        ramp = self.cfg.training.alpha_ramp_epochs * self.steps_per_epoch
        return self.cfg.training.alpha * (min(1.0, step / ramp) if ramp > 0 else 1.0)

    def _autocast(self):
        if self.use_fsdp or self.compute_dtype == torch.float32:
            return nullcontext()  # FSDP's MixedPrecisionPolicy casts parameters and inputs
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def train_step(
        self, batch: dict[str, torch.Tensor], measure_grad_norm: bool = False
    ) -> tuple[Any, torch.Tensor]:
        """One optimizer step on one batch.

        Returns the model output and a 0-d bool tensor, True when the update was applied (the
        loss was finite). With fused AdamW the skip happens on the device (the optimizer's
        ``found_inf``, as GradScaler uses it) and the step has no host sync; otherwise one
        ``bool()`` decides it.
        """
        images = normalize_images(batch["images"].to(self.device, non_blocking=True))
        input_ids = batch["input_ids"].to(self.device, non_blocking=True)
        attention_mask = batch["attention_mask"].to(self.device, non_blocking=True)
        self.model.clamp_temperature_()
        with self._autocast():
            self.momentum.update(self.model)
            targets = self.momentum.targets(images, input_ids, attention_mask)
            self.negatives_generator.manual_seed(
                derive_seed(self.cfg.job.seed, self.dist.rank, self.step)
            )
            out = self.model(
                images,
                input_ids,
                attention_mask,
                targets,
                alpha=self.alpha(self.step),
                generator=self.negatives_generator,
            )
        out.loss.backward()
        if not self.use_fsdp:
            all_reduce_gradients(self.model.parameters())
        finite = torch.isfinite(out.loss.detach())
        if self.cfg.training.grad_clip is not None or measure_grad_norm:
            self.grad_norm = self._clip_gradients()
        if self.optimizer.defaults.get("fused"):
            self.optimizer.found_inf = (~finite).float()
            self.optimizer.step()
        elif bool(finite):
            self.optimizer.step()
        if self.cfg.parallel.float8:
            float8_precompute_scales(self.model)  # one all-reduce for all float8 weight scales
        self.momentum.enqueue(targets.image_feat_m, targets.text_feat_m, valid=finite)
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        return out, finite

    def _clip_gradients(self) -> torch.Tensor:
        """Global gradient norm (for logging), clipping to `training.grad_clip` when set.

        Only called when clipping is on or at a log step: the norm is a pass over every gradient
        plus, under FSDP, an all-reduce."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.training.grad_clip
        if clip is None:
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, foreach=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def train(self) -> None:
        """Step until `training.steps` (or `epochs`), a stop signal, or too many bad steps."""
        cfg = self.cfg
        window = _Window(self.device)
        self.grad_norm = torch.zeros((), device=self.device)
        nonfinite_run = torch.zeros((), dtype=torch.long, device=self.device)
        while self.step < self.total_steps:
            if self._agreed_stop():
                logger.warning(
                    "signal %s: saving at step %d, then exiting", self._stop_signal, self.step
                )
                break
            t0 = time.perf_counter()
            batch = next(self.loader)
            window.data_wait += time.perf_counter() - t0
            logging_now = (self.step + 1) % cfg.metrics.log_every == 0
            out, finite = self.train_step(
                batch, measure_grad_norm=logging_now or self.step + 1 == self.total_steps
            )
            self.step += 1
            nonfinite_run = (nonfinite_run + 1) * (~finite)
            window.add(out, finite)
            last = self.step == self.total_steps
            if self.step % cfg.metrics.log_every == 0 or last:
                self._log(window, out)
                window = _Window(self.device)
                if int(nonfinite_run) >= cfg.training.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{int(nonfinite_run)} consecutive steps had a non-finite loss (limit "
                        f"training.max_nonfinite_steps={cfg.training.max_nonfinite_steps}); each "
                        f"skipped its update. Newest checkpoint: {self.checkpointer.latest_complete()}"
                    )
            self.evaluator.maybe_run(self.step, self.model)
            if self.step % cfg.checkpoint.interval == 0 and not last:
                self.save_checkpoint()
        self.save_checkpoint()

    def _log(self, window: _Window, out: Any) -> None:
        """Host sync point: turn the window's device sums into one metrics record."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        record = window.means()
        self.nonfinite_steps += window.skipped()
        elapsed = time.perf_counter() - window.start
        global_batch = self.cfg.data.batch_size * self.dist.world_size
        samples_per_sec = global_batch * window.steps / elapsed
        record.update(
            lr=self.optimizer.param_groups[0]["lr"],
            alpha=self.alpha(self.step - 1),
            temp=out.temp.item(),
            grad_norm=self.grad_norm.item(),
            samples_per_sec=samples_per_sec,
            mfu=effective_mfu(
                samples_per_sec / self.dist.world_size,
                flops_per_sample(self.cfg.model.name),
                peak_flops(self.device),
            ),
            max_memory_gib=max_memory_gib(self.device),
            data_wait_frac=window.data_wait / elapsed,
            bad_samples=self.loader.stats().get("bad_samples", 0),
            nonfinite_steps=self.nonfinite_steps,
            epoch=self.step // self.steps_per_epoch,
        )
        self.metrics.log(self.step, record)

    # ------------------------------------------------------------------ signals and cleanup
    def _install_signal_handlers(self) -> None:
        def request_stop(signum, _frame):
            self._stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, request_stop)

    def _agreed_stop(self) -> bool:
        """True on every rank once any rank got SIGTERM/SIGINT (CPU all-reduce, no GPU sync)."""
        flag = torch.tensor([1 if self._stop_signal is not None else 0])
        if self.dist.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self._stop_signal is None:
            self._stop_signal = -1
        return bool(flag.item())

    def cleanup(self) -> None:
        """Flush metrics, finish pending saves, release modules, tear the process group down."""
        for name in ("metrics", "checkpointer"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.close()
        for name in ("model", "momentum", "optimizer", "lr_scheduler", "loader"):
            if hasattr(self, name):
                delattr(self, name)
        shutdown_distributed()


def main(argv: list[str] | None = None) -> int:
    cfg = parse_recipe_args(argv, description=__doc__ or "")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True
    )
    recipe = BlipPretrainRecipe(cfg)
    try:
        recipe.setup()
        recipe.train()
    finally:
        recipe.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
