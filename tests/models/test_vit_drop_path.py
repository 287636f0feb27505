"""DropPath: per-sample stochastic depth with its rate in a non-persistent buffer."""

from __future__ import annotations

import pytest
import torch

from blip_recipes.models.builders import vit
from blip_recipes.models.vit import DropPath


def _tiny_vit(drop_path_rate: float, depth: int = 4) -> torch.nn.Module:
    return vit(
        patch_size=16, image_size=32, width=32, depth=depth, heads=2, drop_path_rate=drop_path_rate
    )


def test_train_mode_zeroes_or_rescales_each_sample():
    torch.manual_seed(0)
    p = 0.3
    drop = DropPath(p).train()
    x = torch.randn(256, 5, 8)  # (B, N, D)
    out = drop(x)
    dropped = (out == 0).flatten(1).all(dim=1)
    kept = ~dropped
    torch.testing.assert_close(out[kept], x[kept] / (1 - p))
    assert dropped.any() and kept.any()
    assert dropped.float().mean().item() == pytest.approx(p, abs=0.1)  # 256 samples: ~3.5 sigma


def test_low_precision_input_keeps_its_dtype():
    x = torch.randn(16, 5, 8, dtype=torch.bfloat16)
    assert DropPath(0.3).train()(x).dtype == torch.bfloat16


def test_eval_mode_and_rate_zero_are_exact_identities():
    x = torch.randn(8, 5, 8)
    assert torch.equal(DropPath(0.3).eval()(x), x)
    assert torch.equal(DropPath(0.0).train()(x), x)
    assert torch.equal(DropPath(0.0, enabled=True).train()(x), x)  # all-ones mask


def test_rate_is_a_non_persistent_float32_buffer():
    drop = DropPath(0.25)
    assert drop.rate.dtype == torch.float32 and drop.rate.ndim == 0
    assert drop.rate.item() == 0.25 and drop.p == 0.25
    assert "rate" not in drop.state_dict()
    assert "p=0.25" in repr(drop) and "enabled=True" in repr(drop)
    with pytest.raises(ValueError):
        DropPath(1.0)
    with pytest.raises(ValueError):
        DropPath(0.1, enabled=False)


def test_builder_enables_every_block_of_a_drop_path_vit():
    with_drop, without = _tiny_vit(0.1), _tiny_vit(0.0)
    assert [b.drop_path.enabled for b in with_drop.blocks] == [True] * 4  # block 0 too (rate 0)
    assert [b.drop_path.enabled for b in without.blocks] == [False] * 4
    rates = [b.drop_path.rate.item() for b in with_drop.blocks]
    assert rates == pytest.approx([0.1 * i / 3 for i in range(4)])
    # the buffers add no state_dict keys: checkpoints and converters see parameters only
    assert list(with_drop.state_dict()) == [n for n, _ in with_drop.named_parameters()]
    assert list(with_drop.state_dict()) == list(without.state_dict())


def test_init_buffers_after_to_empty_from_meta():
    with torch.device("meta"):
        model = _tiny_vit(0.1)
    model.to_empty(device="cpu")
    for block in model.blocks:  # garbage after to_empty: make it visibly wrong first
        block.drop_path.rate.fill_(float("nan"))
    model.init_buffers()
    for block in model.blocks:
        assert block.drop_path.rate.device.type == "cpu"
        assert block.drop_path.rate.item() == pytest.approx(block.drop_path.p)
        assert block.drop_path.rate.dtype == torch.float32


def test_init_weights_also_fills_the_buffers():
    model = _tiny_vit(0.1)
    for block in model.blocks:
        block.drop_path.rate.fill_(float("nan"))
    model.init_weights()
    assert [b.drop_path.rate.item() for b in model.blocks] == pytest.approx(
        [b.drop_path.p for b in model.blocks]
    )


def test_load_state_dict_keeps_the_rates():
    source, target = _tiny_vit(0.1), _tiny_vit(0.1)
    target.load_state_dict(source.state_dict(), strict=True)
    assert [b.drop_path.rate.item() for b in target.blocks] == pytest.approx(
        [b.drop_path.p for b in target.blocks]
    )


def test_drop_path_compiles_with_fullgraph():
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    drop = DropPath(0.5).train()
    compiled = torch.compile(drop, backend=counting_backend, fullgraph=True)
    x = torch.randn(64, 3, 4)
    out = compiled(x)
    kept = ~(out == 0).flatten(1).all(dim=1)
    torch.testing.assert_close(out[kept], x[kept] * 2)
    drop.rate.fill_(0.0)  # a new rate is data, not a guard: same graph, all samples kept
    torch.testing.assert_close(compiled(x), x)
    assert len(graphs) == 1
