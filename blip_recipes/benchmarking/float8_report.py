"""The per-layer float8 benchmark's report: layer names compacted to patterns, the markdown
table of every distinct shape (bf16 and float8 times, speedup, what the ``"auto"`` filter decides),
totals of one pass through all timed linears, and float8's share of the GEMM FLOPs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def compact_layers(patterns: Sequence[str]) -> str:
    """``a.q, a.k, b.q`` -> ``a.{q,k}, b.q``: FQN patterns merged by parent for the table."""
    leaves: dict[str, list[str]] = {}
    for pattern in patterns:
        parent, _, leaf = pattern.rpartition(".")
        leaves.setdefault(parent, []).append(leaf)
    parts = []
    for parent, names in leaves.items():
        if not parent:
            parts += names
        elif len(names) == 1:
            parts.append(f"{parent}.{names[0]}")
        else:
            parts.append(f"{parent}.{{{','.join(names)}}}")
    return ", ".join(parts)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_row(row: dict[str, Any], recipes: Sequence[str]) -> str:
    """One measured shape as a console line (bf16 and each recipe's time and speedup)."""
    f8 = ", ".join(
        f"{r} {_ms(row['float8_ms'].get(r))} ms (x{row['speedup'].get(r) or 0:.2f})"
        for r in recipes
    )
    errors = "".join(f"; {name} failed: {e}" for name, e in row["errors"].items())
    return (
        f"  M={row['rows']} K={row['in_features']} N={row['out_features']}: "
        f"bf16 {_ms(row['bf16_ms'])} ms, {f8}{errors}"
    )


def summarize(rows: Sequence[dict[str, Any]], recipes: Sequence[str]) -> dict[str, Any]:
    """Count-weighted linear time of one pass through every timed layer, per recipe: all bf16,
    float8 everywhere (``"all"``), float8 where the ``"auto"`` filter says, and the per-layer
    best. None where a timing is missing."""
    out: dict[str, Any] = {}
    bf16 = [r["bf16_ms"] for r in rows]
    if any(v is None for v in bf16):
        return out
    out["bf16_ms"] = sum(r["count"] * r["bf16_ms"] for r in rows)
    for recipe in recipes:
        f8 = [r["float8_ms"].get(recipe) for r in rows]
        if any(v is None for v in f8):
            out[recipe] = None
            continue
        pairs = [(r["count"], r["bf16_ms"], v, r["auto"].get(recipe)) for r, v in zip(rows, f8)]
        out[recipe] = {
            "all_ms": sum(n * f for n, _, f, _ in pairs),
            "auto_ms": sum(n * (f if auto else b) for n, b, f, auto in pairs),
            "best_ms": sum(n * min(b, f) for n, b, f, _ in pairs),
        }
    return out


def _gemm_size(row: dict[str, Any]) -> int:
    return row["count"] * row["rows"] * row["in_features"] * row["out_features"]


def float8_flop_share(rows: Sequence[dict[str, Any]], recipes: Sequence[str]) -> dict[str, float]:
    """Recipe -> fraction of the linear GEMM FLOPs (count * M * K * N over the table's rows, the
    heads excluded) that the ``"auto"`` filter puts in float8."""
    total = sum(_gemm_size(r) for r in rows) or 1
    return {
        recipe: sum(_gemm_size(r) for r in rows if r["auto"].get(recipe)) / total
        for recipe in recipes
    }


def format_layer_table(rows: Sequence[dict[str, Any]], recipes: Sequence[str]) -> str:
    """A Markdown table: layers, count, M, K, N, the auto filter's decision per recipe and, when
    timed, bf16 ms and float8 ms / speedup per recipe."""
    timed = any(r.get("bf16_ms") is not None for r in rows)
    head = ["layers", "count", "M", "K", "N", *(f"auto {r}" for r in recipes)]
    if timed:
        head.append("bf16 ms")
        for r in recipes:
            head += [f"{r} ms", f"{r} speedup"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            compact_layers(row["layers"]),
            str(row["count"]),
            str(row["rows"]),
            str(row["in_features"]),
            str(row["out_features"]),
            *("float8" if row["auto"].get(r) else "bf16" for r in recipes),
        ]
        if timed:
            cells.append(_ms(row["bf16_ms"]))
            for r in recipes:
                speedup = row["speedup"].get(r)
                cells += [
                    _ms(row["float8_ms"].get(r)),
                    "-" if speedup is None else f"{speedup:.2f}x",
                ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_summary(summary: dict[str, Any], recipes: Sequence[str]) -> str:
    """The lines of :func:`summarize` for the console."""
    if "bf16_ms" not in summary:
        return "totals: some bf16 timings failed"
    lines = [f"one pass through all timed linears: bf16 {summary['bf16_ms']:.2f} ms"]
    for r in recipes:
        s = summary.get(r)
        if s is None:
            lines.append(f"  {r}: some timings failed")
            continue
        lines.append(
            f"  {r}: float8 everywhere {s['all_ms']:.2f} ms, auto filter {s['auto_ms']:.2f} ms, "
            f"best per layer {s['best_ms']:.2f} ms"
        )
    return "\n".join(lines)


__all__ = [
    "compact_layers",
    "float8_flop_share",
    "format_layer_table",
    "format_row",
    "format_summary",
    "summarize",
]
