"""The per-layer float8 filter: torchao's shape heuristic ("auto") vs every multiple-of-16 linear
("all"), on the ViT-B / ViT-L / BERT-base shapes of the BLIP presets (CPU, emulated float8)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from blip_recipes.benchmarking.float8_layers import build_meta_model, fqn_pattern
from blip_recipes.parallel.float8 import (
    FLOAT8_FILTER_DEFAULT,
    FLOAT8_SKIP_FQNS,
    SKIP_BELOW_AUTO_THRESHOLD,
    SKIP_BY_NAME,
    SKIP_NOT_LINEAR,
    SKIP_NOT_MULTIPLE_OF_16,
    _fallback_auto_filter,
    apply_float8,
    float8_module_filter,
    float8_skip_reason,
    torchao_auto_filter,
)
from tests.parallel.parallel_toy import ToyModel, toy_batch, toy_loss

RECIPES = ("tensorwise", "rowwise")

# (fqn, in_features K, out_features N, auto tensorwise converts, auto rowwise converts)
VIT_B = [
    ("visual_encoder.blocks.0.attn.qkv", 768, 2304, True, False),
    ("visual_encoder.blocks.0.attn.proj", 768, 768, False, False),
    ("visual_encoder.blocks.0.mlp.fc1", 768, 3072, True, False),
    ("visual_encoder.blocks.0.mlp.fc2", 3072, 768, False, False),
]
VIT_L = [
    ("visual_encoder.blocks.0.attn.qkv", 1024, 3072, True, False),
    ("visual_encoder.blocks.0.attn.proj", 1024, 1024, False, False),
    ("visual_encoder.blocks.0.mlp.fc1", 1024, 4096, True, False),
    ("visual_encoder.blocks.0.mlp.fc2", 4096, 1024, False, False),
]
TEXT = [
    ("text.layers.0.self_attn.query", 768, 768, False, False),
    ("text.layers.0.causal_self_attn.out", 768, 768, False, False),
    ("text.layers.0.cross_attn.key", 768, 768, False, False),  # ViT-B image tokens
    ("text.layers.0.cross_attn.value", 1024, 768, False, False),  # ViT-L image tokens
    ("text.layers.0.ffn.fc1", 768, 3072, True, False),
    ("text.layers.0.ffn.fc2", 3072, 768, False, False),
]
HEADS = [("vision_proj", 1024, 256), ("text_proj", 768, 256), ("itm_head", 768, 2),
         ("lm_head.dense", 768, 768), ("lm_head.dense", 8192, 8192)]  # fmt: skip
# Converted under auto tensorwise, as FQN patterns; auto rowwise converts nothing.
TENSORWISE_AUTO = [
    "visual_encoder.blocks.*.attn.qkv",
    "visual_encoder.blocks.*.mlp.fc1",
    "text.layers.*.ffn.fc1",
]


def meta_linear(k: int, n: int) -> nn.Linear:
    return nn.Linear(k, n, device="meta")


@pytest.mark.parametrize("fqn, k, n, tensorwise, rowwise", VIT_B + VIT_L + TEXT)
def test_auto_filter_decides_by_shape(fqn, k, n, tensorwise, rowwise):
    from torchao.float8 import _auto_filter_for_recipe

    linear = meta_linear(k, n)
    for recipe, expected in zip(RECIPES, (tensorwise, rowwise)):
        keep = float8_module_filter(recipe, FLOAT8_SKIP_FQNS, "auto")
        assert keep(linear, fqn) is expected, (recipe, fqn)
        assert _auto_filter_for_recipe(recipe, list(FLOAT8_SKIP_FQNS))(linear, fqn) is expected
        assert _fallback_auto_filter(recipe, FLOAT8_SKIP_FQNS)(linear, fqn) is expected
        reason = float8_skip_reason(linear, fqn, recipe, FLOAT8_SKIP_FQNS, "auto")
        assert reason == (None if expected else SKIP_BELOW_AUTO_THRESHOLD)
        # the "all" rule converts every one of these shapes
        assert float8_module_filter(recipe, FLOAT8_SKIP_FQNS, "all")(linear, fqn)


@pytest.mark.parametrize("fqn, k, n", HEADS)
@pytest.mark.parametrize("module_filter", ["auto", "all"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_heads_always_skipped(fqn, k, n, module_filter, recipe):
    linear = meta_linear(k, n)
    assert not float8_module_filter(recipe, FLOAT8_SKIP_FQNS, module_filter)(linear, fqn)
    assert float8_skip_reason(linear, fqn, recipe, FLOAT8_SKIP_FQNS, module_filter) == SKIP_BY_NAME


def test_skip_reasons():
    assert float8_skip_reason(nn.LayerNorm(32), "norm") == SKIP_NOT_LINEAR
    assert float8_skip_reason(nn.Linear(24, 32), "x") == SKIP_NOT_MULTIPLE_OF_16
    assert float8_skip_reason(nn.Linear(24, 4096), "x", module_filter="auto") == (
        SKIP_NOT_MULTIPLE_OF_16
    )
    assert float8_skip_reason(nn.Linear(32, 64), "blocks.0.fc1") is None
    assert float8_skip_reason(nn.Linear(32, 64), "blocks.0.fc1", module_filter="auto") == (
        SKIP_BELOW_AUTO_THRESHOLD
    )
    with pytest.raises(ValueError, match="module filter"):
        float8_module_filter("tensorwise", (), "some")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="recipe"):
        float8_skip_reason(nn.Linear(32, 64), "x", "blockwise")  # type: ignore[arg-type]


def test_fallback_matches_torchao_around_the_thresholds():
    from torchao.float8 import _auto_filter_for_recipe

    dims = [16, 256, 1008, 1024, 1040, 2032, 2048, 2064, 4080, 4096, 4112, 8192]
    for recipe in RECIPES:
        ours = _fallback_auto_filter(recipe, ("head",))
        theirs = _auto_filter_for_recipe(recipe, ["head"])
        for k in dims:
            for n in dims:
                for fqn in ("blocks.0.fc1", "itm_head"):
                    assert ours(meta_linear(k, n), fqn) == theirs(meta_linear(k, n), fqn), (
                        recipe, k, n, fqn,
                    )  # fmt: skip


def test_fallback_used_without_torchao_auto_filter(monkeypatch):
    import torchao.float8

    monkeypatch.delattr(torchao.float8, "_auto_filter_for_recipe")
    keep = torchao_auto_filter("tensorwise", FLOAT8_SKIP_FQNS)
    assert keep(meta_linear(1024, 4096), "visual_encoder.blocks.0.mlp.fc1")
    assert not keep(meta_linear(4096, 1024), "visual_encoder.blocks.0.mlp.fc2")
    assert not keep(meta_linear(8192, 8192), "lm_head.dense")


def test_recommended_default_is_auto_and_apply_float8_default_is_all():
    import inspect

    assert FLOAT8_FILTER_DEFAULT == "auto"
    default = inspect.signature(apply_float8).parameters["module_filter"].default
    assert default == "all"  # callers that predate the filter keep their behaviour


@pytest.mark.parametrize("model_name", ["blip_pretrain_base", "blip_pretrain_large"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_apply_float8_auto_on_meta_presets(model_name, recipe, caplog):
    from torchao.float8.float8_linear import Float8Linear

    model = build_meta_model(model_name)
    with caplog.at_level(logging.INFO, logger="blip_recipes.parallel.float8"):
        converted = apply_float8(
            model, recipe, skip_fqns=FLOAT8_SKIP_FQNS, module_filter="auto", fsdp_all_gather=False
        )
    groups = sorted({fqn_pattern(fqn) for fqn in converted})
    float8 = sorted(n for n, m in model.named_modules() if isinstance(m, Float8Linear))
    assert float8 == sorted(converted)
    if recipe == "rowwise":
        assert converted == []
        assert "no linear passed the filter" in caplog.text
    else:
        assert groups == sorted(TENSORWISE_AUTO)
        depth = 12 if model_name == "blip_pretrain_base" else 24
        assert len(converted) == 2 * depth + 12  # qkv + fc1 per ViT block, fc1 per text layer
        assert f"converted {len(converted)} linears" in caplog.text
    assert "skipped by name" in caplog.text  # the four heads


def test_apply_float8_auto_on_tiny_toy_converts_nothing(caplog):
    model = ToyModel()
    with caplog.at_level(logging.INFO, logger="blip_recipes.parallel.float8"):
        converted = apply_float8(model, "tensorwise", emulate=True, skip_fqns=("head",),
                                 module_filter="auto")  # fmt: skip
    assert converted == []
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert "no linear passed the filter" in caplog.text
    assert "4 too small for float8 (auto filter)" in caplog.text
    tokens, targets = toy_batch(0)
    assert torch.isfinite(toy_loss(model, tokens, targets))


class WideBlock(nn.Module):
    """Linears sized around torchao's thresholds: 32 -> 2064 -> 2064 -> 32, plus a head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_in = nn.Linear(32, 2064)  # N > 1024: tensorwise yes; K <= 1024: rowwise no
        self.fc_mid = nn.Linear(2064, 2064)  # K > 2048, N > 2048: both recipes
        self.fc_out = nn.Linear(2064, 32)  # N <= 1024, K <= 4096: neither
        self.head = nn.Linear(32, 2064)  # big enough, skipped by name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.fc_in(x))
        return self.head(self.fc_out(torch.nn.functional.gelu(self.fc_mid(h))))


@pytest.mark.parametrize(
    "recipe, expected",
    [("tensorwise", ["fc_in", "fc_mid"]), ("rowwise", ["fc_mid"])],
)
def test_auto_filter_model_trains_in_emulation(recipe, expected):
    from torchao.float8.float8_linear import Float8Linear

    torch.manual_seed(0)
    model = WideBlock()
    x = torch.randn(2, 8, 32)
    ref = model(x).square().mean().item()
    converted = apply_float8(model, recipe, emulate=True, skip_fqns=("head",),
                             module_filter="auto")  # fmt: skip
    assert sorted(converted) == expected
    assert sorted(n for n, m in model.named_modules() if isinstance(m, Float8Linear)) == expected
    loss = model(x).square().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(ref, rel=0.1)  # float8 rounding, same function
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
