"""Reporting: environment versions, one-line progress, the Markdown table, JSON-safe values."""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
from typing import Any

import torch


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Hardware and software versions for the results table."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "torchao": _version("torchao"),
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=props.name,
            device_memory_gib=props.total_memory / 2**30,
            cudnn=torch.backends.cudnn.version(),
            nccl=".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.nccl else None,
        )
    else:
        info["device_name"] = platform.processor() or "cpu"
    return info


def one_line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"  {r['name']}: ERROR {r['error']}"
    ratio = r.get("ratio_vs_baseline")
    return (
        f"  {r['name']}: {r['samples_per_sec']:.1f} samples/s, step {r['step_ms_mean']:.1f} "
        f"+- {r['step_ms_std']:.1f} ms, peak {r['peak_memory_gib']:.2f} GiB"
        + (f", x{ratio:.2f} vs baseline" if ratio else "")
        + (f", losses {', '.join(f'{k}={v:.3f}' for k, v in r['losses'].items())}")
    )


def format_table(report: dict[str, Any]) -> str:
    """A Markdown table of the results (the tool prints it; docs/performance.md uses it)."""
    lines = [
        "| run | batch | samples/s | eff. MFU | step ms (mean +- std) | peak GiB | vs baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['batch_size']} | error: {r['error'][:60]} | | | | |")
            continue
        mfu = r.get("effective_mfu")
        ratio = r.get("ratio_vs_baseline")
        lines.append(
            f"| {r['name']} | {r['batch_size']} | {r['samples_per_sec']:.1f} | "
            f"{'-' if mfu is None else f'{100 * mfu:.1f}%'} | "
            f"{r['step_ms_mean']:.1f} +- {r['step_ms_std']:.1f} | {r['peak_memory_gib']:.2f} | "
            f"{'-' if ratio is None else f'{ratio:.2f}x'} |"
        )
    profiled = [r for r in report["results"] if r.get("profile")]
    if profiled:
        from blip_recipes.benchmarking.profiling import PARTS

        lines += ["", "| run (ms per step) | " + " | ".join(PARTS) + " |",
                  "|---|" + "---|" * len(PARTS)]  # fmt: skip
        for r in profiled:
            split = r["profile"]["per_step_ms"]
            lines.append(f"| {r['name']} b{r['batch_size']} | "
                         + " | ".join(f"{split[p]:.1f}" for p in PARTS) + " |")  # fmt: skip
    return "\n".join(lines)


def nan_to_none(value: Any) -> Any:
    """JSON has no NaN: map non-finite floats (a diverged loss) to None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_to_none(v) for v in value]
    return value
