"""Count FSDP2 collectives per sharded module (the communication-budget test's probe).

Private: patches FSDP2 internals (`FSDPParamGroup.unshard` / `post_backward` and the collectives
they call) for the duration of a `with` block and records, per FSDP unit, how many all-gathers
and reduce-scatters actually ran. Prefetches are attributed to the unit they gather.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from torch import nn
from torch.distributed.fsdp._fully_shard import _fsdp_param_group as param_group_module


def unit_names(**roots: nn.Module) -> dict[int, str]:
    """`{id(module): "name.fqn"}` for every module under each named root (`online=model, ...`)."""
    return {id(m): f"{name}.{fqn}" if fqn else name
            for name, root in roots.items() for fqn, m in root.named_modules()}  # fmt: skip


@contextlib.contextmanager
def count_fsdp_collectives(names: dict[int, str]) -> Iterator[Counter]:
    """Yield a Counter of `("all_gather" | "reduce_scatter", unit name)` filled while active.

    Args:
        names: `unit_names(...)` of the sharded models; a unit is named by its module.
    """
    counts: Counter = Counter()
    group_cls = param_group_module.FSDPParamGroup
    original_all_gather = param_group_module.foreach_all_gather
    original_reduce = param_group_module.foreach_reduce
    original_unshard = group_cls.unshard
    original_post_backward = group_cls.post_backward
    current: list[str] = []

    def traced(method):
        def wrapper(self, *args, **kwargs):
            current.append(names.get(id(self.modules[0]), self._module_fqn or "?"))
            try:
                return method(self, *args, **kwargs)
            finally:
                current.pop()

        return wrapper

    def counted(kind, collective):
        def wrapper(*args, **kwargs):
            counts[kind, current[-1] if current else "?"] += 1
            return collective(*args, **kwargs)

        return wrapper

    group_cls.unshard = traced(original_unshard)
    group_cls.post_backward = traced(original_post_backward)
    param_group_module.foreach_all_gather = counted("all_gather", original_all_gather)
    param_group_module.foreach_reduce = counted("reduce_scatter", original_reduce)
    try:
        yield counts
    finally:
        group_cls.unshard = original_unshard
        group_cls.post_backward = original_post_backward
        param_group_module.foreach_all_gather = original_all_gather
        param_group_module.foreach_reduce = original_reduce
