"""One dataclass per TOML section. Each field's docstring is its help text (``blip run --help``).

The field docstrings are plain string literals placed right after the field, as Sphinx's
``#:``-free attribute docstrings; :func:`blip_recipes.config.field_docs` reads them back.
Components receive their own section (``cfg.data``, ``cfg.optimizer``...), never the whole config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class JobConfig:
    output_dir: str = "outputs/blip"
    """Folder for checkpoints, metrics.jsonl and TensorBoard events of this run."""
    seed: int = 42
    """Seed for weights, queues, data order, augmentation and negative sampling."""
    name: str = "blip"
    """A name for the run, shown in logs."""
    cpu_threads: int = 0
    """Intra-op CPU threads per process (torch.set_num_threads); 0 = auto: OMP_NUM_THREADS when set, else on CPU runs the cores this process may use divided by the ranks on the host, else torch's default."""
    collective_timeout_s: float = 600.0
    """Seconds a rank waits in one collective (the start-up rendezvous, a step's all-reduce, a checkpoint's gathers) for its peers before the run stops with an error naming the wait, exit 1 (a stopped, hung or lost rank; torch's own default is 30 minutes)."""
    stop_timeout_s: float = 900.0
    """blip run with torchrun flags: seconds the ranks get to save and exit after a stop signal; ranks still running then are killed (SIGCONT, SIGKILL) and blip run exits 1."""


@dataclass
class ModelConfig:
    name: Literal["blip_pretrain_tiny", "blip_pretrain_base", "blip_pretrain_large"] = (
        "blip_pretrain_base"
    )
    """Model builder from blip_recipes.models."""
    image_size: int = 224
    """Input resolution in pixels (square)."""
    embed_dim: int = 256
    """Width of the ITC projection space."""
    drop_path_rate: Optional[float] = None
    """ViT stochastic depth; None keeps the builder's default (0 for ViT-B, 0.1 for ViT-L)."""
    text_init: Optional[str] = None
    """Local BERT checkpoint (HF folder or bert-base-uncased state dict) to initialise the text side from."""
    vision_init: Optional[str] = None
    """Local DeiT/timm-style ViT .pth to initialise the image encoder from."""


@dataclass
class MomentumConfig:
    queue_size: int = 57600
    """Number of momentum features kept in each ITC queue; must be a multiple of batch_size * world size."""
    decay: float = 0.995
    """EMA factor of the momentum encoders: p_m = decay * p_m + (1 - decay) * p."""
    train_mode: bool = True
    """Run the momentum encoders in train mode (dropout active) as the reference does."""
    alpha: float = 0.4
    """Final weight of the momentum-distillation targets in ITC."""
    alpha_ramp_epochs: float = 2.0
    """Alpha rises linearly from 0 over this many epochs."""


@dataclass
class TokenizerConfig:
    kind: Literal["wordpiece", "bpe", "synthetic"] = "wordpiece"
    """wordpiece: transformers BERT tokenizer from `path`; bpe: tiktoken file at `path`; synthetic: built-in vocabulary of the synthetic data set."""
    path: Optional[str] = None
    """vocab.txt or tokenizer folder (wordpiece), or a .tiktoken ranks file (bpe)."""
    max_length: int = 30
    """Fixed caption length in tokens, special tokens included."""


@dataclass
class DataSourceConfig:
    kind: Literal["synthetic", "json", "jsonl", "shards"] = "synthetic"
    """synthetic: generated shapes and captions; json/jsonl: BLIP annotations + image_root; shards: webdataset tars."""
    paths: list[str] = field(default_factory=list)
    """Annotation files (json/jsonl) or shard files / brace patterns like shards-{00000..00127}.tar."""
    image_root: str = ""
    """Folder that the annotation image paths are relative to."""
    weight: float = 1.0
    """Relative sampling weight when several sources are mixed."""
    num_samples: int = 4096
    """Size of the synthetic source (other kinds count their files)."""
    image_size: int = 128
    """Side in pixels of the generated images (synthetic only; the train transform then crops and resizes)."""


@dataclass
class DataConfig:
    sources: list[DataSourceConfig] = field(default_factory=lambda: [DataSourceConfig()])
    """Training sources, as [[data.sources]] tables; override as data.sources.0.kind=json."""
    batch_size: int = 75
    """Samples per rank per step (global batch = batch_size * world size)."""
    num_workers: int = 4
    """Loader worker processes per rank (0 loads in the training process)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    timeout_s: float = 600.0
    """Longest a rank waits for one batch (from its loader workers, or made in its own process with num_workers=0) before the run stops naming the stalled worker or the stuck read, exit 1; a dead worker stops it within a second, a stop request shortens the wait to 30 s."""
    pin_memory: bool = True
    """Pin host batches for faster copies to CUDA (ignored on CPU)."""
    max_words: int = 30
    """Captions are cut to this many words by pre_caption."""
    min_scale: float = 0.2
    """Lower bound of the RandomResizedCrop area scale."""
    randaugment: bool = True
    """Apply RandAugment(N=2, M=5) over the reference's ten ops."""
    shuffle_buffer: int = 1000
    """Shuffle buffer of streamed tar shards."""
    max_bad_fraction: float = 0.05
    """Stop the run when more than this fraction of samples could not be read."""
    bad_fraction_min_samples: int = 1000
    """Samples a rank reads before max_bad_fraction is enforced (a few early bad files do not stop a run)."""
    max_aspect_ratio: float = 20.0
    """Images more elongated than this (long side / short side) are bad samples."""
    min_image_size: int = 8
    """Images whose shorter side is below this many pixels (1x1 tracking pixels, icons) are bad samples."""
    jpeg_draft: bool = True
    """Decode JPEGs at reduced size (Image.draft) when the random crop still has enough pixels."""


@dataclass
class OptimizerConfig:
    name: Literal["adamw"] = "adamw"
    """Optimizer."""
    lr: float = 3e-4
    """Peak learning rate."""
    weight_decay: float = 0.05
    """Decoupled weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    decay_norms_and_biases: bool = True
    """Apply weight decay to biases, norms and other 1-d params as the reference does; false excludes them."""
    fused: Optional[bool] = None
    """Fused AdamW kernel (one pass per tensor, the update skipped on the device); None picks it on CUDA and CPU; false: foreach AdamW."""


@dataclass
class LRSchedulerConfig:
    name: Literal["step", "cosine"] = "step"
    """step: linear warmup, then lr * decay_rate**epoch (reference); cosine: warmup, then cosine to min_lr."""
    warmup_steps: int = 3000
    """Linear warmup from warmup_lr to lr over this many steps."""
    warmup_lr: float = 1e-6
    """Learning rate at step 0."""
    decay_rate: float = 0.9
    """Per-epoch decay of the step schedule (the paper text says 0.85, the code 0.9)."""
    min_lr: float = 1e-6
    """Floor of both schedules."""


@dataclass
class TrainingConfig:
    steps: Optional[int] = None
    """Stop after this many optimizer steps; None runs `epochs` epochs."""
    epochs: int = 20
    """Number of passes over the data when `steps` is None."""
    steps_per_epoch: Optional[int] = None
    """Steps that make one epoch for schedules and alpha; None derives it from the data size."""
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Parameter dtype in compute: auto is bf16 on CUDA and fp32 on CPU."""
    grad_clip: Optional[float] = None
    """Clip the global gradient norm to this value (reference: none)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (global batch = data.batch_size x world size x this): each micro-batch runs ITC against the queue and enqueues its momentum features; EMA update, gradient sync and optimizer step happen once per optimizer step."""
    max_nonfinite_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient norm (each one skips its update on every rank)."""
    deterministic: bool = False
    """Deterministic kernels only (torch.use_deterministic_algorithms): GPU runs and resumes become bitwise reproducible, at some speed; an op without a deterministic kernel then fails naming itself. CPU runs are deterministic either way."""


@dataclass
class ParallelConfig:
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto: CUDA when present, else CPU with gloo."""
    data_parallel: Literal["fsdp", "hsdp", "ddp"] = "fsdp"
    """How ranks share the model: fsdp shards parameters, gradients and optimizer state over all ranks (FSDP2, one unit per block); hsdp shards within groups of world / dp_replicate ranks (a node) and replicates across them (2-D mesh); ddp replicates everything and all-reduces gradients during backward. One rank never shards."""
    dp_replicate: int = 0
    """hsdp only: number of replicas (the shard degree is world size / dp_replicate); 0 = one replica per node (world size / ranks per node)."""
    reshard_after_forward: bool = True
    """Free gathered parameters after forward (saves memory, costs an all-gather in backward)."""
    compile: bool = False
    """torch.compile each transformer block."""
    activation_checkpointing: Literal["none", "full", "vit_last_n"] = "none"
    """none; full: every block; vit_last_n: the last `ac_vit_layers` ViT blocks (reference)."""
    ac_vit_layers: int = 0
    """Number of trailing ViT blocks to checkpoint with vit_last_n."""
    float8: bool = False
    """Train eligible linears in float8 through torchao."""
    float8_recipe: Literal["tensorwise", "rowwise"] = "tensorwise"
    """torchao float8 scaling recipe."""
    float8_filter: Literal["auto", "all"] = "auto"
    """Which linears train in float8: auto keeps only the shapes where float8 matmuls pay off (torchao's shape rule per recipe; docs/float8.md); all converts every linear with dims divisible by 16. The small heads never."""
    float8_emulate: bool = False
    """Emulate float8 matmuls (for CPU tests)."""
    float8_fsdp_all_gather: bool = True
    """All-gather float8 weights with precomputed scales (tensorwise only)."""
    single_rank_fsdp: bool = True
    """One rank with bf16 compute: shard with FSDP2 at degree 1 anyway, so its mixed-precision policy (bf16 parameters) keeps the residual stream and LayerNorm outputs bf16 between the matmuls, as on several ranks; false: no FSDP2 on one rank and bf16 autocast instead (matmuls in bf16, everything between them fp32). fp32 runs on one rank never shard."""
    lm_loss: Literal["chunked", "full"] = "chunked"
    """Pretraining's LM loss: chunked (the vocab projection in the compute dtype, 8 row chunks, each chunk's label-smoothed cross-entropy summed in fp32 and compiled with parallel.compile; no fp32 logits) or full (fp32 logits of every row, then the cross-entropy; the previous structure)."""
    negative_kv: Literal["select", "recompute"] = "select"
    """Pretraining: the hard-negative images' cross-attention keys/values in each MED layer are selected from the batch's own (projected once per image; a one-hot matmul) or recomputed from their tokens (the previous structure, for comparison)."""
    compile_objective: bool = True
    """With parallel.compile: pretraining's ITC (momentum distillation over the queues), the hard-negative draw and the ITM loss run as two compiled graphs (fullgraph) instead of about 95 small eager kernels forward + backward; false runs them eagerly (the previous structure). Same losses and negatives."""
    reduce_reused: Literal["once", "per_use"] = "once"
    """FSDP2 units that forward runs twice per step (the MED layers, the root): once = their gradients are summed over both uses and reduce-scattered once at the end of backward (half their reduce-scatter bytes and one all-gather fewer; their unsharded fp32 gradients live until then); per_use = reduce-scattered after each use's backward (the previous structure)."""


@dataclass
class CheckpointConfig:
    interval: int = 1000
    """Save every this many steps (and at the end)."""
    keep_latest_k: int = 3
    """Keep this many newest checkpoints; 0 keeps all."""
    resume: str = "auto"
    """auto: newest complete checkpoint in output_dir; none: start fresh; or a checkpoint folder."""
    init_from: Optional[str] = None
    """Initialise model weights (only) from this checkpoint folder."""
    async_save: bool = False
    """Save in the background on a dedicated gloo group."""
    signal_check_every: int = 10
    """Optimizer steps between the checks whether any rank received SIGTERM, SIGINT or SIGUSR1, or lost its launcher (one small host collective per check); the run then saves and exits at that step."""


@dataclass
class MetricsConfig:
    log_every: int = 10
    """Log (and sync with the host) every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard scalars, caption image grids and hparams under output_dir/tensorboard."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the wandb extra: pip install 'blip-recipes[wandb]'); WANDB_MODE=offline keeps the run local."""
    wandb_project: str = "blip-recipes"
    """W&B project."""
    wandb_run_name: Optional[str] = None
    """W&B run name; None uses job.name."""
    wandb_entity: Optional[str] = None
    """W&B team or user; None uses the logged-in account's default."""


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Run retrieval evaluation every this many steps during pretraining (0: never)."""
    annotation: Optional[str] = None
    """COCO-Karpathy-style test annotations: [{"image": path, "caption": [texts]}]."""
    image_root: str = ""
    """Folder the evaluation image paths are relative to."""
    checkpoint: Optional[str] = None
    """Model to evaluate: a DCP checkpoint folder, a reference BLIP .pth, or a HF BLIP folder; "init": the model a pretraining run of this config starts from (step 0: model.text_init / vision_init, checkpoint.init_from)."""
    allow_resolution_change: bool = False
    """Evaluate at model.image_size even when the checkpoint was trained at another resolution (position embeddings interpolated; recall usually drops); false refuses."""
    k_test: int = 256
    """Candidates per query reranked with ITM."""
    text_max_length: int = 35
    """Token length of evaluation captions."""
    batch_size: int = 64
    """Images or texts per forward pass."""
    num_captions: int = 4
    """Captions of fixed eval images logged to TensorBoard at eval steps."""
    save_scores: bool = False
    """Also write retrieval_scores.pt: every query's top-k candidates with their ITC and ITM scores and ranks."""
    progress: bool = True
    """Show a progress bar on rank 0 while encoding and reranking."""


@dataclass
class CapfiltConfig:
    captioner: Optional[str] = None
    """Captioning model (blip_capfilt): a DCP checkpoint or run folder, HF BLIP folder, reference .pth, .pt or .safetensors."""
    filter: Optional[str] = None
    """Filtering model whose ITM head scores every caption (blip_capfilt); any checkpoint format, may equal captioner."""
    inputs: list[str] = field(default_factory=list)
    """Web image-text pairs: BLIP JSON / JSONL annotation files, or tar shards (paths, brace patterns, remote URLs)."""
    input_kind: Literal["auto", "json", "jsonl", "shards"] = "auto"
    """Kind of capfilt.inputs; auto: from the suffix (.json, .jsonl, .tar)."""
    image_root: str = ""
    """Folder the image paths of JSON/JSONL inputs are relative to; the output's paths are relative to it too."""
    unit_size: int = 1000
    """Records per work unit of JSON/JSONL inputs (a shard is one unit); units are the grain of distribution and resume."""
    num_captions: int = 1
    """Synthetic captions sampled per image."""
    top_p: float = 0.9
    """Nucleus sampling mass of the captioner."""
    sampling_top_k: int = 50
    """Only the k most likely tokens are sampled from (Hugging Face generate's default, as the reference); 0 = no limit."""
    repetition_penalty: float = 1.1
    """Penalty on tokens already generated (the reference's nucleus sampling uses 1.1)."""
    max_length: int = 20
    """Longest caption in tokens, [DEC] and prompt included."""
    min_length: int = 5
    """[SEP] is forbidden before this length, [DEC] and prompt included."""
    prompt: str = "a picture of "
    """Decoder prompt; stripped from the synthetic captions."""
    threshold: float = 0.5
    """A caption is kept when its ITM match probability is at least this (0.5: ITM predicts matched)."""
    synthetic_top_k: Optional[int] = None
    """Keep at most this many synthetic captions per image (those passing the threshold, highest ITC similarity first); None keeps all."""
    batch_size: int = 32
    """Images per captioning and scoring batch (part of the run's identity: a resume needs the same)."""
    text_max_length: int = 35
    """Token length of the captions scored by the filter (35 as in the reference's retrieval)."""


@dataclass
class RetrievalConfig:
    negatives_all_ranks: bool = True
    """Draw ITM hard negatives from the global batch (image embeddings, texts and ids gathered from every rank; COCO in the reference) instead of within each rank's batch (Flickr30k)."""
    test_annotation: Optional[str] = None
    """Test split (same format as eval.annotation, images under eval.image_root) scored with the best epoch's weights at the end of blip_finetune_retrieval; None skips it."""
    eval_every_epochs: int = 1
    """blip_finetune_retrieval evaluates eval.annotation (the validation split) every this many epochs and at the last step, and keeps the weights with the best r_mean."""


@dataclass
class CaptionConfig:
    prompt: str = "a picture of "
    """blip_finetune_caption: decoder prompt, put before every training caption (its tokens and [DEC] are excluded from the loss) and before generation (stripped from the captions)."""
    test_annotation: Optional[str] = None
    """Test split ({"image", "caption": [texts]} records, images under eval.image_root) captioned and scored with the kept weights at the end of blip_finetune_caption; None skips it."""
    eval_every_epochs: int = 1
    """blip_finetune_caption captions and scores eval.annotation (the validation split) every this many epochs (0: only at the last step) and at the last step, and keeps the weights with the best CIDEr + BLEU-4 in best/."""
    min_lr: float = 0.0
    """blip_finetune_caption's LR schedule: cosine over training.epochs from optimizer.lr down to this, constant within an epoch ([lr_scheduler] is not used)."""
    method: Literal["beam", "greedy", "nucleus"] = "beam"
    """Decoding of the evaluation captions."""
    num_beams: int = 3
    """Beams per image (method beam)."""
    max_length: int = 20
    """Longest generated sequence in tokens, [DEC] and the prompt included."""
    min_length: int = 5
    """[SEP] is not allowed before this many tokens ([DEC] and the prompt included)."""
    repetition_penalty: float = 1.0
    """CTRL repetition penalty of the evaluation decoding (1.0: none)."""


@dataclass
class NlvrConfig:
    train_annotation: Optional[str] = None
    """blip_finetune_nlvr: NLVR2-style training records ({"images": [left, right], "sentence", "label": True/False}, JSON list or JSONL), image paths under nlvr.image_root; data.sources is not used."""
    dev_annotation: Optional[str] = None
    """Validation split (same format), scored every nlvr.eval_every_epochs epochs and at the last step; the weights with the best accuracy are kept in best/. None: the last weights count as best."""
    test_annotation: Optional[str] = None
    """Test split (same format) scored with the kept weights at the end; None skips it."""
    image_root: str = ""
    """Folder the annotation files' image paths are relative to ("" = as written)."""
    eval_every_epochs: int = 1
    """Validate every this many epochs (0: only at the last step)."""
    min_lr: float = 0.0
    """LR schedule: cosine over training.epochs from optimizer.lr down to this, constant within an epoch, no warm-up (the reference's; [lr_scheduler] is not used)."""
    merge_from: Optional[int] = None
    """First text layer whose two image contexts are merged by a linear layer over their concatenation (the layers below average them); None = half the text depth (6 of 12, as the reference)."""


@dataclass
class VqaConfig:
    answer_list: Optional[str] = None
    """blip_finetune_vqa: candidate answers (a JSON list of strings, the reference's answer_list.json) that inference "rank" picks from."""
    inference: Literal["rank", "generate"] = "rank"
    """Evaluation answers: "rank" the candidate list with the decoder (top k by first-token probability, re-scored whole), or "generate" them by beam search."""
    k_test: int = 128
    """Candidates re-scored per question (inference rank)."""
    eval_every_epochs: int = 0
    """Answer eval.annotation (VQA question records, images under eval.image_root) every this many epochs (0: only after the last step); scored when its records have answers."""
    min_lr: float = 0.0
    """LR schedule: cosine over training.epochs from optimizer.lr down to this, constant within an epoch ([lr_scheduler] is not used)."""
    num_beams: int = 3
    """Beams per question (inference generate)."""
    max_length: int = 10
    """Longest generated answer in tokens, [DEC] included (inference generate)."""
    min_length: int = 1
    """[SEP] is not allowed before this many tokens, [DEC] included (inference generate)."""
    num_examples: int = 8
    """Evaluation questions shown in TensorBoard with their image and predicted answer."""


@dataclass
class ZeroShotConfig:
    image_folder: Optional[str] = None
    """blip_eval_zeroshot: an ImageFolder-style tree (<image_folder>/<class name>/<images>, classes in sorted order); with zeroshot.annotation, the folder its image paths are relative to."""
    annotation: Optional[str] = None
    """JSON list of {"image", "label"} records (label: class name or 0-based index) instead of class subfolders; needs zeroshot.classes."""
    classes: Optional[str] = None
    """JSON list of class names (or {"classes": [...]}) for zeroshot.annotation; underscores read as spaces."""
    templates: list[str] = field(
        default_factory=lambda: ["a picture of a {}.", "a photo of a {}.", "an image of a {}."]
    )
    """Prompt templates, "{}" standing for the class name; each class's ITC text feature is the normalised mean over them."""
    rerank_k: int = 0
    """Re-score each image's top-k classes with ITM (match logit averaged over the templates, plus the ITC similarity); 0: ITC only."""


@dataclass
class VideoConfig:
    annotation: Optional[str] = None
    """blip_eval_retrieval_video: MSRVTT-style test annotations (JSON list or JSONL): {"video": path} or {"clip_name": name} (the file <video.root>/<name><video.suffix>), and "caption" (a text or list of texts)."""
    root: str = ""
    """Folder the video paths and clip names are relative to."""
    suffix: str = ".mp4"
    """File suffix appended to a record's clip_name."""
    num_frames: int = 8
    """Frames read per video (frame i * floor(length / num_frames), the reference's uniform sampling), each encoded as an image."""


@dataclass
class Config:
    """The whole run configuration: one attribute per TOML section."""

    job: JobConfig = field(default_factory=JobConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    momentum: MomentumConfig = field(default_factory=MomentumConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    capfilt: CapfiltConfig = field(default_factory=CapfiltConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    nlvr: NlvrConfig = field(default_factory=NlvrConfig)
    vqa: VqaConfig = field(default_factory=VqaConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
