"""Per-layer float8 benchmark: bf16 ``nn.Linear`` vs torchao ``Float8Linear`` on every distinct
linear shape of a BLIP preset, next to what the ``"auto"`` float8 filter decides for it.

    shapes, by_name = preset_layer_shapes("blip_pretrain_large", batch=128)
    rows = benchmark_layer_shapes(shapes, recipes=("tensorwise", "rowwise"), device=cuda)
    print(format_layer_table(rows, ("tensorwise", "rowwise")))   # float8_report.py

The model is built on the meta device and only walked (``named_modules``), never run: each
``nn.Linear`` becomes an (M, K, N) GEMM with K = in_features, N = out_features and M the rows one
pass feeds it: ``batch * image_tokens`` for the ViT and for the cross-attention key/value (they
read the image tokens), ``text_batch * text_tokens`` for every other text linear (``text_batch``
defaults to ``batch``; a pass that runs several captions per image has more). Linears with the
same (M, K, N) share one row of the table. Linears skipped by name (the heads) are listed apart
and not timed.

Timing (:func:`time_fwd_bwd`): forward + backward (input, weight and bias gradients) of one
module, compiled with ``torch.compile`` unless asked not to, on bf16 inputs; the median of
per-iteration CUDA-event times after warm-up. Before the timed iterations the GPU is held by a
sleep kernel so the host queues them ahead and the events time the kernels, not Python launch
overhead.
"""

from __future__ import annotations

import copy
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from blip_recipes.benchmarking.float8_report import format_row
from blip_recipes.benchmarking.timing import StepTimer
from blip_recipes.parallel.float8 import (
    FLOAT8_SKIP_FQNS,
    Float8Recipe,
    apply_float8,
    float8_skip_reason,
)

#: Caption length in tokens (the tokenizer's fixed ``max_length``).
TEXT_TOKENS = 30
#: GPU cycles of head start per timed iteration (about 1 ms at 2 GHz) for the host to queue it.
LAUNCH_AHEAD_CYCLES_PER_ITER = 2_000_000


@dataclass
class LayerShape:
    """One distinct linear GEMM of a model.

    Attributes:
        rows: M, rows per pass (tokens in the batch).
        in_features: K.
        out_features: N.
        layers: FQN patterns with ``*`` for the block index (``visual_encoder.blocks.*.mlp.fc1``).
        count: how many modules have this shape.
        auto: recipe -> whether the ``"auto"`` filter converts it to float8.
    """

    rows: int
    in_features: int
    out_features: int
    layers: list[str] = field(default_factory=list)
    count: int = 0
    auto: dict[str, bool] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fqn_pattern(fqn: str) -> str:
    """``text.layers.11.ffn.fc1`` -> ``text.layers.*.ffn.fc1``."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", fqn)


def reads_image_tokens(fqn: str) -> bool:
    """True for the ViT linears and the cross-attention key/value (they project image tokens)."""
    return fqn.startswith("visual_encoder.") or bool(re.search(r"\.cross_attn\.(key|value)$", fqn))


def rows_per_pass(
    fqn: str, batch: int, image_tokens: int, text_tokens: int, text_batch: int | None = None
) -> int:
    """M of the linear at ``fqn``: ``batch * image_tokens`` for one that reads image tokens,
    else ``text_batch * text_tokens`` (``text_batch`` defaults to ``batch``)."""
    if reads_image_tokens(fqn):
        return batch * image_tokens
    return (batch if text_batch is None else text_batch) * text_tokens


def collect_layer_shapes(
    model: nn.Module,
    batch: int,
    image_tokens: int,
    text_tokens: int = TEXT_TOKENS,
    recipes: Sequence[Float8Recipe] = ("tensorwise", "rowwise"),
    skip_fqns: tuple[str, ...] = FLOAT8_SKIP_FQNS,
    text_batch: int | None = None,
) -> tuple[list[LayerShape], list[str]]:
    """The distinct linear shapes of ``model`` (in module order) and the FQN patterns skipped by
    name (never float8, not timed).

    Args:
        model: the model, on any device (meta is fine: only ``named_modules`` is read).
        batch: images per pass.
        image_tokens: tokens per image (197 for 224 px, patch 16).
        text_tokens: tokens per caption.
        recipes: recipes to record the ``"auto"`` filter's decision for.
        skip_fqns: FQN substrings kept in high precision.
        text_batch: captions per pass through the text linears (default ``batch``).
    """
    shapes: dict[tuple[int, int, int], LayerShape] = {}
    by_name: list[str] = []
    for fqn, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        pattern = fqn_pattern(fqn)
        if any(skip in fqn for skip in skip_fqns):
            if pattern not in by_name:
                by_name.append(pattern)
            continue
        m = rows_per_pass(fqn, batch, image_tokens, text_tokens, text_batch)
        key = (m, module.in_features, module.out_features)
        if key not in shapes:
            shapes[key] = LayerShape(*key)
            shapes[key].auto = {
                r: float8_skip_reason(module, fqn, r, skip_fqns, "auto") is None for r in recipes
            }
        shape = shapes[key]
        shape.count += 1
        if pattern not in shape.layers:
            shape.layers.append(pattern)
    return list(shapes.values()), by_name


def build_meta_model(model_name: str) -> nn.Module:
    """Preset ``model_name`` built on the meta device (no memory, no init cost)."""
    from blip_recipes.models import build_model

    with torch.device("meta"):
        return build_model(model_name)


def image_tokens_of(model: nn.Module) -> int:
    """Tokens per image of a BLIP model: patches + cls (197 at 224 px, patch 16)."""
    return int(model.visual_encoder.pos_embed.shape[1])


def preset_layer_shapes(
    model_name: str,
    batch: int,
    text_tokens: int = TEXT_TOKENS,
    image_tokens: int | None = None,
    recipes: Sequence[Float8Recipe] = ("tensorwise", "rowwise"),
    skip_fqns: tuple[str, ...] = FLOAT8_SKIP_FQNS,
) -> tuple[list[LayerShape], list[str]]:
    """:func:`collect_layer_shapes` of preset ``model_name`` built on the meta device;
    ``image_tokens`` defaults to the model's (:func:`image_tokens_of`)."""
    model = build_meta_model(model_name)
    if image_tokens is None:
        image_tokens = image_tokens_of(model)
    return collect_layer_shapes(model, batch, image_tokens, text_tokens, recipes, skip_fqns)


def _launch_ahead(iters: int) -> None:
    """Keep the GPU busy while the host queues ``iters`` iterations (no-op off CUDA)."""
    if torch.cuda.is_available() and hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(iters * LAUNCH_AHEAD_CYCLES_PER_ITER)


def time_fwd_bwd(
    module: nn.Module,
    x: torch.Tensor,
    grad_out: torch.Tensor,
    warmup: int = 5,
    iters: int = 20,
) -> float:
    """Median milliseconds of ``module(x)`` forward + backward (gradients of ``x`` and of every
    parameter; nothing accumulates). ``module`` may be a compiled wrapper; it compiles during
    the warm-up. CUDA events on CUDA, ``perf_counter`` elsewhere."""
    params = [p for p in module.parameters() if p.requires_grad]
    inputs = (x, *params)

    def step() -> None:
        torch.autograd.grad(module(x), inputs, grad_out)

    for _ in range(warmup):
        step()
    timer = StepTimer(x.device)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        _launch_ahead(iters)
    for _ in range(iters):
        timer.start()
        step()
        timer.stop()
    return statistics.median(timer.step_times_ms())


def make_layer(
    shape: LayerShape,
    recipe: Float8Recipe | None,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    emulate: bool = False,
) -> nn.Module:
    """A ``nn.Linear(K, N)`` with bias in ``dtype`` on ``device``, converted to ``Float8Linear``
    for ``recipe`` (None = left as is) through :func:`apply_float8` with the ``"all"`` filter."""
    torch.manual_seed(0)
    linear = nn.Linear(shape.in_features, shape.out_features, device=device, dtype=dtype)
    if recipe is None:
        return linear
    holder = nn.Sequential(copy.deepcopy(linear))
    apply_float8(holder, recipe, emulate=emulate, fsdp_all_gather=False, module_filter="all")
    return holder[0]


def time_layer(
    shape: LayerShape,
    recipe: Float8Recipe | None,
    device: torch.device,
    compile: bool = True,
    emulate: bool = False,
    warmup: int = 5,
    iters: int = 20,
    dtype: torch.dtype = torch.bfloat16,
) -> float:
    """Milliseconds of forward + backward of ``shape`` in bf16 (``recipe`` None) or float8."""
    module = make_layer(shape, recipe, device, dtype, emulate)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape.rows, shape.in_features, device=device, dtype=dtype, generator=gen)
    x.requires_grad_(True)
    grad_out = torch.randn(
        shape.rows, shape.out_features, device=device, dtype=dtype, generator=gen
    )
    if compile:
        torch._dynamo.reset()  # a fresh cache per layer: no recompile limit, no dynamic shapes
        module = torch.compile(module, dynamic=False)
    try:
        return time_fwd_bwd(module, x, grad_out, warmup, iters)
    finally:
        del module, x, grad_out
        if device.type == "cuda":
            torch.cuda.empty_cache()


def benchmark_layer_shapes(
    shapes: Sequence[LayerShape],
    recipes: Sequence[Float8Recipe],
    device: torch.device,
    compile: bool = True,
    emulate: bool = False,
    warmup: int = 5,
    iters: int = 20,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Time every shape in bf16 and in float8 per recipe.

    Returns:
        One dict per shape: the :class:`LayerShape` fields plus ``bf16_ms``, ``float8_ms``
        (recipe -> ms) and ``speedup`` (recipe -> bf16 / float8; > 1 = float8 faster). A run
        that fails (out of memory, unsupported GPU) records None and the message in ``errors``.
    """
    results = []
    for shape in shapes:
        row = shape.as_dict() | {"bf16_ms": None, "float8_ms": {}, "speedup": {}, "errors": {}}
        for recipe in (None, *recipes):
            name = recipe or "bf16"
            try:
                ms = time_layer(shape, recipe, device, compile, emulate, warmup, iters)
            except Exception as e:  # one failing shape or recipe must not end the run
                ms = None
                row["errors"][name] = f"{type(e).__name__}: {e}"[:500]
            if recipe is None:
                row["bf16_ms"] = ms
            else:
                row["float8_ms"][recipe] = ms
                bf16 = row["bf16_ms"]
                row["speedup"][recipe] = bf16 / ms if bf16 and ms else None
        if log:
            log(format_row(row, recipes))
        results.append(row)
    return results
