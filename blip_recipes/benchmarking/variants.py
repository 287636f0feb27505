"""Benchmark variants: a short name -> the config overrides that make the recipe run that way.

A variant name is a ``-``-joined list of tokens, read left to right::

    eager-fp32   eager-bf16   compile-bf16   compile-bf16-float8-rowwise   compile-bf16-ac-full

| token | effect (config override) |
|---|---|
| ``eager`` / ``compile`` | ``parallel.compile`` false / true (default: compile) |
| ``fp32`` / ``bf16`` | ``training.mixed_precision`` (default: bf16) |
| ``float8-tensorwise`` / ``float8-rowwise`` | ``parallel.float8=true`` + recipe (emulated on CPU) |
| ``ac-on`` / ``ac-full`` | ``parallel.activation_checkpointing=full`` |
| ``ac-off`` | ``parallel.activation_checkpointing=none`` (the default) |
| ``ac-vitN`` | checkpoint the last N ViT blocks (``vit_last_n``, the reference's choice) |
| ``nofsdp`` / ``ddp`` | ``parallel.data_parallel=ddp`` (replicated parameters, gradients all-reduced during backward) |
| ``hsdp`` | ``parallel.data_parallel=hsdp`` (sharded within a node, replicated across nodes) |
| ``noreshard`` | ``parallel.reshard_after_forward=false`` |
| ``fused`` / ``unfused`` | ``optimizer.fused`` true / false (unfused: foreach AdamW + host-sync skip) |
| ``autocast`` | ``parallel.single_rank_fsdp=false``: one bf16 rank autocasts instead of running FSDP2 at degree 1 |
| ``lmchunked`` / ``lmfull`` | ``parallel.lm_loss`` chunked / full (fp32 logits) |
| ``kvselect`` / ``kvrecompute`` | ``parallel.negative_kv`` select / recompute (hard negatives' keys/values) |
| ``rsonce`` / ``rsperuse`` | ``parallel.reduce_reused`` once / per_use (reduce-scatters of the MED layers and the root) |
| ``objcompile`` / ``objeager`` | ``parallel.compile_objective`` true / false (ITC, negatives and ITM compiled with ``compile``) |

Each optimisation of the recipe can thus be switched off alone and measured against the same
variant with it on (``compile-bf16`` vs ``compile-bf16-unfused``, ``compile-bf16-noreshard``, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_AC_VIT = re.compile(r"ac-vit(\d+)$")

DEFAULT_VARIANTS = ("eager-fp32", "eager-bf16", "compile-bf16")
"""What ``tools/benchmark.py`` runs when ``--variants`` is not given."""

FULL_VARIANTS = (
    "eager-fp32",
    "eager-bf16",
    "compile-bf16",
    "compile-bf16-float8-tensorwise",
    "compile-bf16-float8-rowwise",
    "compile-bf16-ac-full",
)
"""Every precision, float8 recipe and activation-checkpointing mode in one run
(``--variants full``)."""

ABLATION_VARIANTS = (
    "compile-bf16",
    "compile-bf16-unfused",
    "compile-bf16-nofsdp",
    "compile-bf16-noreshard",
)
"""One optimisation off at a time, against ``compile-bf16`` (``--variants ablation``)."""

PRESETS = {"default": DEFAULT_VARIANTS, "full": FULL_VARIANTS, "ablation": ABLATION_VARIANTS}


@dataclass(frozen=True)
class Variant:
    """One way of running the recipe.

    Attributes:
        name: the name as given (``compile-bf16-float8-rowwise``).
        overrides: ``section.key=value`` config overrides, applied after the benchmark's base.
        float8: the float8 recipe, or None.
        compile: whether blocks are compiled.
        precision: ``fp32`` or ``bf16``.
    """

    name: str
    overrides: tuple[str, ...] = field(default_factory=tuple)
    float8: str | None = None
    compile: bool = True
    precision: str = "bf16"

    def for_device(self, device_type: str) -> tuple[str, ...]:
        """Overrides for ``device_type``: float8 runs in torchao's emulation on CPU."""
        extra = ("parallel.float8_emulate=true",) if self.float8 and device_type != "cuda" else ()
        return self.overrides + extra


def _tokens(name: str) -> list[str]:
    """Split on ``-`` and re-join the two-part tokens (``float8-rowwise``, ``ac-vit6``)."""
    parts = name.strip().lower().split("-")
    tokens: list[str] = []
    i = 0
    while i < len(parts):
        if parts[i] in ("float8", "ac") and i + 1 < len(parts):
            tokens.append(f"{parts[i]}-{parts[i + 1]}")
            i += 2
        else:
            tokens.append(parts[i])
            i += 1
    return tokens


def parse_variant(name: str) -> Variant:
    """Parse one variant name (see the module docstring for the tokens).

    Example:
        >>> parse_variant("compile-bf16-float8-rowwise").overrides[:2]
        ('parallel.compile=true', 'training.mixed_precision=bf16')

    Raises:
        ValueError: on an unknown or conflicting token, naming it.
    """
    compile_, precision, float8 = True, "bf16", None
    ac = "none"
    extra: list[str] = []
    seen: set[str] = set()
    for token in _tokens(name):
        kind = token
        if token in ("eager", "compile"):
            kind, compile_ = "mode", token == "compile"
        elif token in ("fp32", "bf16"):
            kind, precision = "precision", token
        elif token in ("float8-tensorwise", "float8-rowwise"):
            kind, float8 = "float8", token.split("-")[1]
        elif token in ("ac-on", "ac-full", "ac-off") or _AC_VIT.match(token):
            kind = "ac"
            ac = "none" if token == "ac-off" else "full" if token in ("ac-on", "ac-full") else token
        elif token in ("nofsdp", "ddp", "hsdp"):
            kind = "data_parallel"
            extra.append(f"parallel.data_parallel={'hsdp' if token == 'hsdp' else 'ddp'}")
        elif token == "noreshard":
            extra.append("parallel.reshard_after_forward=false")
        elif token in ("fused", "unfused"):
            kind = "optimizer"
            extra.append(f"optimizer.fused={'true' if token == 'fused' else 'false'}")
        elif token == "autocast":
            extra.append("parallel.single_rank_fsdp=false")
        elif token in ("lmchunked", "lmfull"):
            kind = "lm_loss"
            extra.append(f"parallel.lm_loss={token[2:]}")
        elif token in ("kvselect", "kvrecompute"):
            kind = "negative_kv"
            extra.append(f"parallel.negative_kv={token[2:]}")
        elif token in ("rsonce", "rsperuse"):
            kind = "reduce_reused"
            extra.append(f"parallel.reduce_reused={'once' if token == 'rsonce' else 'per_use'}")
        elif token in ("objcompile", "objeager"):
            kind = "compile_objective"
            extra.append(f"parallel.compile_objective={str(token == 'objcompile').lower()}")
        else:
            raise ValueError(
                f"variant {name!r}: unknown token {token!r}; known: eager, compile, fp32, bf16, "
                "float8-tensorwise, float8-rowwise, ac-on, ac-full, ac-off, ac-vitN, nofsdp, ddp, hsdp, "
                "noreshard, fused, unfused, autocast, lmchunked, lmfull, kvselect, kvrecompute, rsonce, "
                "rsperuse, objcompile, objeager"
            )
        if kind in seen:
            raise ValueError(f"variant {name!r}: more than one {kind} token")
        seen.add(kind)
    overrides = [
        f"parallel.compile={'true' if compile_ else 'false'}",
        f"training.mixed_precision={precision}",
    ]
    if float8:
        overrides += ["parallel.float8=true", f"parallel.float8_recipe={float8}"]
    if ac.startswith("ac-vit"):
        n = int(ac[len("ac-vit") :])
        overrides += ["parallel.activation_checkpointing=vit_last_n", f"parallel.ac_vit_layers={n}"]
    else:
        overrides.append(f"parallel.activation_checkpointing={ac}")
    return Variant(name, tuple(overrides + extra), float8, compile_, precision)


def parse_variants(spec: str) -> list[Variant]:
    """Comma-separated variant names and preset names (``default``, ``full``, ``ablation``)."""
    names: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        for name in PRESETS.get(item, (item,)):
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError("no variants given")
    return [parse_variant(n) for n in names]
