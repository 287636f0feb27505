"""tools/benchmark_float8_layers.py: the dry run (shapes + auto filter decisions) on CPU, the
no-GPU exit, and the timing library on a tiny shape in emulation; the real timing needs CUDA."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blip_recipes.benchmarking.float8_layers import (
    LayerShape,
    benchmark_layer_shapes,
    fqn_pattern,
    preset_layer_shapes,
    rows_per_pass,
)
from blip_recipes.benchmarking.float8_report import (
    compact_layers,
    format_layer_table,
    format_summary,
    summarize,
)

TOOL = Path(__file__).resolve().parents[2] / "tools" / "benchmark_float8_layers.py"
RECIPES = ("tensorwise", "rowwise")
HEADS = ["vision_proj", "text_proj", "itm_head", "lm_head.dense"]


def load_tool():
    spec = importlib.util.spec_from_file_location("benchmark_float8_layers", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def by_layers(rows: list[dict]) -> dict[str, dict]:
    return {", ".join(r["layers"]): r for r in rows}


def test_fqn_helpers():
    assert fqn_pattern("text.layers.11.ffn.fc1") == "text.layers.*.ffn.fc1"
    assert fqn_pattern("visual_encoder.blocks.3.attn.qkv") == "visual_encoder.blocks.*.attn.qkv"
    assert rows_per_pass("visual_encoder.blocks.0.mlp.fc1", 128, 197, 30) == 128 * 197
    assert rows_per_pass("text.layers.0.cross_attn.key", 128, 197, 30) == 128 * 197
    assert rows_per_pass("text.layers.0.cross_attn.value", 128, 197, 30) == 128 * 197
    assert rows_per_pass("text.layers.0.cross_attn.query", 128, 197, 30) == 128 * 30
    assert rows_per_pass("text.layers.0.ffn.fc2", 128, 197, 30) == 128 * 30
    assert rows_per_pass("text.layers.0.ffn.fc2", 128, 197, 30, text_batch=512) == 512 * 30
    assert rows_per_pass("text.layers.0.cross_attn.key", 128, 197, 30, text_batch=512) == 128 * 197
    assert compact_layers(["a.*.q", "a.*.k", "b.q", "head"]) == "a.*.{q,k}, b.q, head"


def test_preset_shapes_large():
    shapes, by_name = preset_layer_shapes("blip_pretrain_large", batch=128)
    assert by_name == HEADS
    got = {(s.rows, s.in_features, s.out_features): (s.count, s.auto) for s in shapes}
    img, txt = 128 * 197, 128 * 30
    tw = {"tensorwise": True, "rowwise": False}
    no = {"tensorwise": False, "rowwise": False}
    assert got == {
        (img, 1024, 3072): (24, tw),  # ViT qkv
        (img, 1024, 1024): (24, no),  # ViT attn.proj
        (img, 1024, 4096): (24, tw),  # ViT mlp.fc1
        (img, 4096, 1024): (24, no),  # ViT mlp.fc2
        (txt, 768, 768): (120, no),  # text q/k/v/out x3 attentions, minus cross key/value
        (img, 1024, 768): (24, no),  # cross-attention key/value on the image tokens
        (txt, 768, 3072): (12, tw),  # text ffn.fc1
        (txt, 3072, 768): (12, no),  # text ffn.fc2
    }


def test_dry_run_cli_base(tmp_path):
    out = tmp_path / "layers.json"
    cmd = [sys.executable, str(TOOL), "--model", "blip_pretrain_base", "--dry-run",
           "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    meta = report["meta"]
    assert meta["dry_run"] and meta["batch"] == 128 and meta["image_tokens"] == 197
    assert meta["text_tokens"] == 30 and meta["text_batch"] == 128
    assert meta["recipes"] == list(RECIPES)
    assert report["skipped_by_name"] == HEADS and report["totals"] == {}
    share = report["auto_float8_flop_share"]
    assert share["rowwise"] == 0 and share["tensorwise"] == pytest.approx(0.45, abs=0.01)
    rows = by_layers(report["layers"])
    assert sum(r["count"] for r in rows.values()) == 12 * 4 + 12 * 14
    assert not any(r["auto"]["rowwise"] for r in rows.values())  # rowwise skips every ViT-B linear
    converted = sorted(k for k, r in rows.items() if r["auto"]["tensorwise"])
    assert converted == [
        "text.layers.*.ffn.fc1", "visual_encoder.blocks.*.attn.qkv",
        "visual_encoder.blocks.*.mlp.fc1",
    ]  # fmt: skip
    shared = rows["visual_encoder.blocks.*.attn.proj, text.layers.*.cross_attn.key, "
                  "text.layers.*.cross_attn.value"]  # fmt: skip
    assert (shared["rows"], shared["in_features"], shared["out_features"]) == (25216, 768, 768)
    assert all(r.get("bf16_ms") is None for r in rows.values())  # nothing timed
    assert "| visual_encoder.blocks.*.attn.qkv | 12 | 25216 | 768 | 2304 | float8 | bf16 |" in (
        proc.stdout
    )
    assert "skipped by name (high precision, not timed): " + ", ".join(HEADS) in proc.stdout
    assert "linear FLOPs in float8 under the auto filter: tensorwise 45%, rowwise 0%" in (
        proc.stdout
    )


def test_dry_run_in_process_custom_tokens(tmp_path, capsys):
    out = tmp_path / "l.json"
    args = ["--model", "blip_pretrain_large", "--dry-run", "--batch", "4", "--text-tokens", "35",
            "--text-batch", "16", "--recipes", "rowwise", "--json", str(out)]  # fmt: skip
    rc = load_tool().main(args)
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["meta"]["recipes"] == ["rowwise"]
    rows = by_layers(report["layers"])
    assert report["meta"]["text_batch"] == 16
    assert rows["text.layers.*.ffn.fc1"]["rows"] == 16 * 35
    assert rows["text.layers.*.cross_attn.key, text.layers.*.cross_attn.value"]["rows"] == 4 * 197
    assert rows["visual_encoder.blocks.*.mlp.fc1"]["rows"] == 4 * 197
    assert all(set(r["auto"]) == {"rowwise"} and not r["auto"]["rowwise"] for r in rows.values())
    assert "auto rowwise" in capsys.readouterr().out
    assert report["auto_float8_flop_share"] == {"rowwise": 0.0}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_without_cuda_exits_2(capsys):
    assert load_tool().main(["--model", "blip_pretrain_base"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "--dry-run" in err


def test_bad_recipe_is_a_usage_error(capsys):
    assert load_tool().main(["--dry-run", "--recipes", "blockwise"]) == 2
    assert "--recipes" in capsys.readouterr().err


def test_timing_library_in_emulation_on_cpu():
    shape = LayerShape(16, 32, 64, ["blocks.*.fc1"], 2, {"tensorwise": False, "rowwise": False})
    logged: list[str] = []
    (row,) = benchmark_layer_shapes([shape], RECIPES, torch.device("cpu"), compile=False,
                                    emulate=True, warmup=1, iters=2, log=logged.append)  # fmt: skip
    assert row["errors"] == {}
    assert row["bf16_ms"] > 0 and all(row["float8_ms"][r] > 0 for r in RECIPES)
    for r in RECIPES:
        assert row["speedup"][r] == pytest.approx(row["bf16_ms"] / row["float8_ms"][r])
    assert logged and "M=16 K=32 N=64" in logged[0]
    totals = summarize([row], RECIPES)
    assert totals["bf16_ms"] == pytest.approx(2 * row["bf16_ms"])
    tw = totals["tensorwise"]
    assert tw["all_ms"] == pytest.approx(2 * row["float8_ms"]["tensorwise"])
    assert tw["auto_ms"] == pytest.approx(totals["bf16_ms"])  # auto keeps this shape in bf16
    assert tw["best_ms"] == pytest.approx(2 * min(row["bf16_ms"], row["float8_ms"]["tensorwise"]))
    table = format_layer_table([row], RECIPES)
    assert (
        "| bf16 ms | tensorwise ms | tensorwise speedup | rowwise ms | rowwise speedup |" in table
    )
    assert "auto filter" in format_summary(totals, RECIPES)


def test_failed_timing_is_recorded_not_raised(monkeypatch):
    import blip_recipes.benchmarking.float8_layers as lib

    def fake_time_layer(shape, recipe, *args, **kwargs):
        if recipe == "rowwise":
            raise RuntimeError("CUDA out of memory")
        return 1.0 if recipe is None else 0.5

    monkeypatch.setattr(lib, "time_layer", fake_time_layer)
    shape = LayerShape(16, 32, 64, ["x"], 3, {"tensorwise": True, "rowwise": False})
    (row,) = lib.benchmark_layer_shapes([shape], RECIPES, torch.device("cpu"))
    assert row["bf16_ms"] == 1.0 and row["speedup"]["tensorwise"] == 2.0
    assert row["float8_ms"]["rowwise"] is None and row["speedup"]["rowwise"] is None
    assert row["errors"] == {"rowwise": "RuntimeError: CUDA out of memory"}
    totals = summarize([row], RECIPES)
    assert totals["rowwise"] is None
    assert totals["tensorwise"] == {"all_ms": 1.5, "auto_ms": 1.5, "best_ms": 1.5}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_timing_small_shape(tmp_path):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 matmuls need SM 8.9+")
    shape = LayerShape(4096, 1024, 4096, ["x"], 1, {r: True for r in RECIPES})
    (row,) = benchmark_layer_shapes([shape], RECIPES, torch.device("cuda"), warmup=3, iters=5)
    assert row["errors"] == {}, row["errors"]
    assert row["bf16_ms"] > 0 and all(row["float8_ms"][r] > 0 for r in RECIPES)
