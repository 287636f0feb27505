"""Where a step's time goes: ViT, momentum, text, ITC, ITM, LM, optimizer, queue, other.

The split comes from the PyTorch profiler. Forward work is labelled by ``record_function`` ranges
named ``bench/<part>``: the HF baseline writes them inline; for our step,
:func:`instrument_step` adds them from outside (forward hooks on the model's parts, wrappers on
the momentum state, optimizer and the objective's loss functions), so the step and the model stay
untouched. Backward work is labelled through the autograd sequence number: every
``autograd::engine::evaluate_function: XBackward`` event carries the sequence number of the forward
op that created its node, and that op sits inside a labelled range. Activation-checkpoint recompute
runs inside such a backward node and is counted with the part it recomputes.

Cost per op: the summed duration of the device kernels it launched (CUDA), or its self CPU time
(CPU runs, where CPU time is the step time). Ops outside any range go to ``other`` (input
normalisation, FSDP root all-gathers and reduce-scatters, the step's small glue).
"""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

PREFIX = "bench/"
PARTS = ("vit", "momentum", "text", "itc", "multimodal", "itm", "lm", "optimizer", "queue", "other")
"""Labels of the split, in report order. ``multimodal`` is our one MED pass for ITM and LM
together; the baseline runs separate ITM and LM passes (``itm``, ``lm``); for ours ``itm`` and
``lm`` are the heads and losses around that pass, and ``itc`` includes the hard-negative draw."""
_BACKWARD = "autograd::engine::evaluate_function"


def _ranged(fn: Callable, part: str) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(PREFIX + part):
            return fn(*args, **kwargs)

    return wrapper


class _RangeHooks:
    """Forward pre/post hooks that open and close a ``record_function`` range around a module."""

    def __init__(self) -> None:
        self._open: list[Any] = []
        self.handles: list[Any] = []

    def add(self, module: nn.Module, part: str | Callable[[tuple, dict], str]) -> None:
        def pre(_module, args, kwargs):
            name = part(args, kwargs) if callable(part) else part
            rf = record_function(PREFIX + name)
            rf.__enter__()
            self._open.append(rf)

        def post(_module, _args, _kwargs, _output):
            if self._open:
                self._open.pop().__exit__(None, None, None)

        self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(module.register_forward_hook(post, with_kwargs=True, always_call=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        while self._open:
            self._open.pop().__exit__(None, None, None)


def _text_part(args: tuple, kwargs: dict) -> str:
    """The MED without images is the unimodal text pass; with images, the multimodal pass."""
    images = kwargs.get("image_embeds", args[2] if len(args) > 2 else None)
    cross_kv = kwargs.get("cross_kv", args[4] if len(args) > 4 else None)
    return "text" if images is None and cross_kv is None else "multimodal"


@contextlib.contextmanager
def _patched(obj: Any, name: str, part: str) -> Iterator[None]:
    """Wrap ``obj.name`` in a range; restores the original (instance attribute or module global)."""
    original = getattr(obj, name)
    had_own = isinstance(obj, type(contextlib)) or name in getattr(obj, "__dict__", {})
    setattr(obj, name, _ranged(original, part))
    try:
        yield
    finally:
        if had_own:
            setattr(obj, name, original)
        else:
            delattr(obj, name)  # drop the instance attribute: the class method shows through


@contextlib.contextmanager
def instrument_step(step: Any) -> Iterator[None]:
    """Label a ``PretrainStep``'s work for :func:`time_split` (undone on exit).

    Hooks: ``model.visual_encoder`` / ``vision_proj`` -> vit; ``model.text`` -> text without
    images, multimodal with them; ``text_proj`` -> text; ``itm_head`` -> itm; ``lm_head`` -> lm.
    Wrappers: ``momentum.update`` / ``targets`` -> momentum, ``enqueue`` -> queue;
    ``optimizer.step`` / ``zero_grad``, the gradient norm and the LR scheduler -> optimizer;
    the step's ``ItcItmLosses`` (eager or compiled): ``itc_and_negatives`` -> itc (ITC and the
    hard negatives drawn from it), ``itm`` -> itm; ``objective.lm_loss`` -> lm.
    """
    from blip_recipes.objectives import pretrain as objective
    from blip_recipes.training import step as optimizer_step

    model = step.model
    hooks = _RangeHooks()
    hooks.add(model.visual_encoder, "vit")
    hooks.add(model.vision_proj, "vit")
    hooks.add(model.text, _text_part)
    hooks.add(model.text_proj, "text")
    hooks.add(model.itm_head, "itm")
    hooks.add(model.lm_head, "lm")
    with contextlib.ExitStack() as stack:
        stack.callback(hooks.remove)
        for obj, name, part in (
            (step.momentum, "update", "momentum"),
            (step.momentum, "targets", "momentum"),
            (step.momentum, "enqueue", "queue"),
            (step.optimizer, "step", "optimizer"),
            (step.optimizer, "zero_grad", "optimizer"),
            (step.lr_scheduler, "step", "optimizer"),
            (optimizer_step, "global_grad_norm", "optimizer"),
            (step.options.itc_itm, "itc_and_negatives", "itc"),
            (step.options.itc_itm, "itm", "itm"),
            (objective, "lm_loss", "lm"),
        ):
            if hasattr(obj, name):
                stack.enter_context(_patched(obj, name, part))
        yield


def _range_part(event: Any) -> tuple[str | None, Any]:
    """(part, None) for the innermost labelled range above ``event``, or (None, backward node)."""
    e = event
    while e is not None:
        if e.name.startswith(PREFIX):
            return e.name[len(PREFIX) :], None
        if e.name.startswith(_BACKWARD):
            return None, e
        e = e.cpu_parent
    return None, None


def time_split(events: Any, steps: int, device_time: bool) -> dict[str, Any]:
    """Attribute profiler ``events`` (``prof.events()``) to :data:`PARTS`.

    Args:
        events: the profiler's function events.
        steps: number of profiled steps (results are per step).
        device_time: count kernel time (CUDA) instead of self CPU time.

    Returns:
        ``{"per_step_ms": {part: ms}, "forward_ms": {...}, "backward_ms": {...},
        "fraction": {part: share of the total}, "total_ms": ms, "basis": "cuda_kernels"|"cpu_self"}``.
    """
    events = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    forward_of: dict[tuple[int, int], str] = {}
    forward_of_seq: dict[int, str] = {}
    for e in events:
        if e.sequence_nr is None or e.sequence_nr < 0 or e.name.startswith(_BACKWARD):
            continue
        part, node = _range_part(e)
        if part is not None and node is None:
            forward_of.setdefault((e.thread, e.sequence_nr), part)
            forward_of_seq.setdefault(e.sequence_nr, part)

    fwd: dict[str, float] = defaultdict(float)
    bwd: dict[str, float] = defaultdict(float)
    for e in events:
        cost = (
            sum(k.duration for k in e.kernels) if device_time else e.self_cpu_time_total
        )  # microseconds
        if cost <= 0:
            continue
        part, node = _range_part(e)
        if part is not None:
            fwd[part] += cost
        elif node is not None:
            key = (node.fwd_thread if node.fwd_thread else node.thread, node.sequence_nr)
            bwd[forward_of.get(key, forward_of_seq.get(node.sequence_nr, "other"))] += cost
        else:
            fwd["other"] += cost
    total = sum(fwd.values()) + sum(bwd.values())
    per_step = {p: (fwd.get(p, 0.0) + bwd.get(p, 0.0)) / 1e3 / steps for p in PARTS}
    return {
        "per_step_ms": per_step,
        "forward_ms": {p: fwd.get(p, 0.0) / 1e3 / steps for p in PARTS},
        "backward_ms": {p: bwd.get(p, 0.0) / 1e3 / steps for p in PARTS},
        "fraction": {p: (per_step[p] * 1e3 * steps / total if total else 0.0) for p in PARTS},
        "total_ms": total / 1e3 / steps,
        "basis": "cuda_kernels" if device_time else "cpu_self",
    }


def profile_steps(
    step: Callable[[], Any], steps: int, device: torch.device, trace_path: str | None = None
) -> dict[str, Any]:
    """Run ``step()`` ``steps`` times under the profiler and return :func:`time_split`'s dict.

    Args:
        step: runs one full training step (already labelled).
        steps: profiled steps (after the caller's warm-up).
        device: CUDA adds the CUDA activity and counts kernel time.
        trace_path: also export a Chrome trace there.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=False, with_stack=False) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    if trace_path:
        prof.export_chrome_trace(trace_path)
    return time_split(prof.events(), steps, device_time=cuda)
