"""Activation checkpointing, per-block compile and float8 conversion on the toy model (1 process)."""

from __future__ import annotations

import pytest
import torch

from blip_recipes.parallel import (
    apply_activation_checkpointing,
    apply_compile,
    apply_float8,
    float8_eligible,
    float8_precompute_scales,
)
from tests.parallel.parallel_toy import ToyModel, toy_batch, toy_loss


def _grads(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    tokens, targets = toy_batch(0)
    torch.manual_seed(seed)  # same dropout masks in both runs
    toy_loss(model, tokens, targets).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_same_grads_and_keys():
    torch.manual_seed(0)
    plain = ToyModel(dropout=0.1)
    ac = ToyModel(dropout=0.1)
    ac.load_state_dict(plain.state_dict())
    keys = list(ac.state_dict().keys())
    apply_activation_checkpointing(list(ac.blocks))
    apply_activation_checkpointing(list(ac.blocks))  # idempotent
    assert list(ac.state_dict().keys()) == keys
    assert [n for n, _ in ac.named_parameters()] == [n for n, _ in plain.named_parameters()]
    g_plain, g_ac = _grads(plain), _grads(ac)
    for name in g_plain:
        torch.testing.assert_close(g_ac[name], g_plain[name], rtol=0, atol=0, msg=name)


def test_activation_checkpointing_recomputes():
    model = ToyModel()
    calls = []
    model.blocks[0].fc1.register_forward_hook(lambda *a: calls.append(1))
    apply_activation_checkpointing([model.blocks[0]])
    tokens, targets = toy_batch(0)
    toy_loss(model, tokens, targets).backward()
    assert len(calls) == 2  # forward + recompute in backward


def test_compile_per_block_in_place():
    torch.manual_seed(0)
    model = ToyModel()
    keys = list(model.state_dict().keys())
    tokens, targets = toy_batch(0)
    eager = toy_loss(model, tokens, targets).item()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    apply_compile(list(model.blocks), backend=counting_backend)
    compiled = toy_loss(model, tokens, targets)
    compiled.backward()
    assert compiled.item() == pytest.approx(eager, rel=1e-6)
    assert list(model.state_dict().keys()) == keys  # no _orig_mod prefix
    assert len(graphs) >= 1
    n_graphs = len(graphs)
    toy_loss(model, tokens, targets)  # second call reuses the compiled graph
    assert len(graphs) == n_graphs


def test_float8_filter():
    assert float8_eligible(torch.nn.Linear(32, 64), "blocks.0.fc1")
    assert not float8_eligible(torch.nn.Linear(32, 10), "proj")
    assert not float8_eligible(torch.nn.Linear(24, 32), "x")
    assert not float8_eligible(torch.nn.Linear(32, 64), "itm_head", skip_fqns=("head",))
    assert not float8_eligible(torch.nn.LayerNorm(32), "norm")


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_emulate_converts_eligible_linears_only(recipe):
    from torchao.float8.float8_linear import Float8Linear

    torch.manual_seed(0)
    model = ToyModel()
    keys = list(model.state_dict().keys())
    tokens, targets = toy_batch(0)
    ref = toy_loss(model, tokens, targets).item()
    converted = apply_float8(model, recipe=recipe, emulate=True, skip_fqns=("head",))
    assert sorted(converted) == [f"blocks.{i}.fc{j}" for i in (0, 1) for j in (1, 2)]
    f8 = sorted(n for n, m in model.named_modules() if isinstance(m, Float8Linear))
    assert f8 == sorted(converted)
    assert type(model.head) is torch.nn.Linear and type(model.proj) is torch.nn.Linear
    assert list(model.state_dict().keys()) == keys
    loss = toy_loss(model, tokens, targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(ref, rel=0.05)  # float8 rounding, same function
    assert all(p.grad is not None for p in model.parameters())
    assert not float8_precompute_scales(model)  # no FSDP: nothing to precompute


@pytest.mark.slow  # inductor cold compile, ~20 s on 2 cores
def test_compile_inductor_matches_eager_dropout_with_fallback_random():
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    model = ToyModel(dropout=0.1)
    torch.manual_seed(1)
    eager = toy_loss(model, *toy_batch(0)).item()
    try:
        apply_compile(list(model.blocks), fallback_random=True)
        torch.manual_seed(1)
        assert toy_loss(model, *toy_batch(0)).item() == eager
    finally:
        inductor_config.fallback_random = False
