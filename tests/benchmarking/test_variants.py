import pytest

from blip_recipes.benchmarking.variants import FULL_VARIANTS, parse_variant, parse_variants
from blip_recipes.config import load_config, validate


def test_tokens_map_to_overrides():
    v = parse_variant("compile-bf16-float8-rowwise-ac-vit6")
    assert v.compile and v.precision == "bf16" and v.float8 == "rowwise"
    assert set(v.overrides) == {
        "parallel.compile=true",
        "training.mixed_precision=bf16",
        "parallel.float8=true",
        "parallel.float8_recipe=rowwise",
        "parallel.activation_checkpointing=vit_last_n",
        "parallel.ac_vit_layers=6",
    }
    assert "parallel.float8_emulate=true" in v.for_device("cpu")
    assert "parallel.float8_emulate=true" not in v.for_device("cuda")
    eager = parse_variant("eager-fp32")
    assert not eager.compile and "parallel.activation_checkpointing=none" in eager.overrides
    assert "parallel.activation_checkpointing=full" in parse_variant("ac-on").overrides
    assert "optimizer.fused=false" in parse_variant("compile-bf16-unfused").overrides
    assert "parallel.reduce_reused=per_use" in parse_variant("compile-bf16-rsperuse").overrides
    assert "parallel.reduce_reused=once" in parse_variant("eager-rsonce").overrides
    assert "parallel.compile_objective=false" in parse_variant("compile-bf16-objeager").overrides
    assert "parallel.compile_objective=true" in parse_variant("compile-objcompile").overrides


@pytest.mark.parametrize("bad", ["eager-fp16", "eager-compile", "compile-bf16-float8-blockwise"])
def test_unknown_or_conflicting_tokens_are_named(bad):
    with pytest.raises(ValueError, match="variant"):
        parse_variant(bad)


def test_presets_expand_and_every_variant_is_a_valid_config():
    names = [v.name for v in parse_variants("full,eager-fp32,ablation")]
    assert names[: len(FULL_VARIANTS)] == list(FULL_VARIANTS)
    assert len(names) == len(set(names))
    for variant in parse_variants("full,ablation"):
        validate(load_config(None, ["tokenizer.kind=synthetic", *variant.for_device("cpu")]))


def test_merge_rounds_takes_the_median_run_and_median_ratio():
    from blip_recipes.benchmarking.runner import merge_rounds

    rounds = [
        [{"name": "b", "samples_per_sec": s}, {"name": "o", "samples_per_sec": 2 * s + d,
                                              "ratio_vs_baseline": (2 * s + d) / s}]
        for s, d in ((10.0, 0.0), (5.0, 5.0), (20.0, -10.0))
    ]  # fmt: skip
    base, ours = merge_rounds(rounds)
    assert base["samples_per_sec"] == 10.0 and base["samples_per_sec_rounds"] == [10.0, 5.0, 20.0]
    assert ours["ratio_vs_baseline_rounds"] == [2.0, 3.0, 1.5]
    assert ours["ratio_vs_baseline"] == 2.0 and ours["rounds"] == 3
    assert merge_rounds(rounds[:1]) == rounds[0]
