"""Find host reads of device values: the ops that make the host wait for the device.

On a GPU, `.item()`, `bool(t)`, `int(t)`, `if t:`, `torch.nonzero`, boolean-mask indexing and
other ops whose output size depends on the data block the CPU until the device has caught up,
which serialises the step. `torch.cuda.set_sync_debug_mode` only sees them on CUDA; this mode
sees the same ops on any device (also CPU, where tests run), because each of them reaches the
dispatcher as one of a few aten ops:

- `aten._local_scalar_dense`: every Python scalar read (`.item()`, `bool()`, `int()`,
  `float()`, `if tensor:`, `torch.equal`'s result, `allclose`);
- data-dependent output shapes: `nonzero`, `masked_select`, `unique*`, `repeat_interleave`
  without `output_size`, indexing with a boolean mask;
- a copy from an accelerator to the CPU (`.cpu()`, `.tolist()` of a device tensor).

Each read is recorded with the innermost project frame that caused it (file:line function), so
a failing test names the call site. Reads issued inside `torch/optim/` are not counted: a
non-capturable optimizer keeps its step counters on the host whatever the device (reading them
costs nothing on a GPU), and on a CPU they would be indistinguishable from device reads.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SCALAR_READS = {"_local_scalar_dense", "item", "is_nonzero"}
_DATA_DEPENDENT_SHAPES = {
    "nonzero",
    "nonzero_static_",
    "masked_select",
    "unique",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "repeat_interleave",
    "argwhere",
}


_WRAPPERS = (
    "torch/_dynamo/",
    "torch/_compile.py",
    "torch/utils/_python_dispatch.py",
    "torch/_ops.py",
)
"""Frames that only wrap a call (the caller is the next frame out)."""


def _is_device_to_host_copy(func, args, kwargs) -> bool:
    name = func.overloadpacket.__name__
    if name not in ("_to_copy", "copy_"):
        return False
    if name == "copy_":
        dst, src = args[0], args[1]
        return dst.device.type == "cpu" and src.device.type not in ("cpu", "meta")
    source = args[0]
    target = kwargs.get("device")
    return (
        target is not None
        and torch.device(target).type == "cpu"
        and source.device.type not in ("cpu", "meta")
    )


def _bool_mask_index(func, args) -> bool:
    if func.overloadpacket.__name__ not in ("index", "index_put", "index_put_"):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices
    )


@dataclass
class HostRead:
    """One host read: the aten op and the project frame that issued it."""

    op: str
    site: str

    def __str__(self) -> str:
        return f"{self.op} at {self.site}"


@dataclass
class HostReads(TorchDispatchMode):
    """Record every host read of a tensor value while active (a `TorchDispatchMode`).

    Usage::

        with HostReads() as reads:
            step(batch, 0, 0.4)
        assert not reads.found, reads.report()

    Attributes:
        found: the reads seen, in order.
        package: frames under this path fragment name the call site (default: the project).
    """

    found: list[HostRead] = field(default_factory=list)
    package: str = "blip_recipes"
    host_resident: tuple[str, ...] = ("torch/optim/",)
    """Innermost frames under these path fragments read host-resident tensors (not counted)."""

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if (
            name in _SCALAR_READS
            or name in _DATA_DEPENDENT_SHAPES
            and not (name == "repeat_interleave" and kwargs.get("output_size") is not None)
            or _bool_mask_index(func, args)
            or _is_device_to_host_copy(func, args, kwargs)
        ):
            stack = traceback.extract_stack()[:-1]
            caller = next(
                (f for f in reversed(stack) if not any(p in f.filename for p in _WRAPPERS)), None
            )
            if caller is None or not any(p in caller.filename for p in self.host_resident):
                self.found.append(HostRead(str(func), self._site(stack)))
        return func(*args, **kwargs)

    def _site(self, stack: traceback.StackSummary) -> str:
        frames = [
            f
            for f in stack
            if self.package in f.filename and not f.filename.endswith("host_reads.py")
        ]
        if not frames:
            return "outside the project"
        frame = frames[-1]
        path = self.package + frame.filename.split(self.package, 1)[-1]
        return f"{path}:{frame.lineno} in {frame.name}: {frame.line}"

    def report(self) -> str:
        """One line per read, or "no host reads"."""
        if not self.found:
            return "no host reads"
        return f"{len(self.found)} host read(s):\n" + "\n".join(f"  {r}" for r in self.found)
