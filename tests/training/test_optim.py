"""AdamW param groups and the exact LR schedules (reference step schedule, cosine), resume included."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from blip_recipes.config.sections import LRSchedulerConfig, OptimizerConfig
from blip_recipes.training.optim import build_lr_scheduler, build_optimizer, lr_at_step


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.temp = nn.Parameter(torch.tensor([0.07]))
        self.pos = nn.Parameter(torch.zeros(1, 3, 4))
        self.frozen = nn.Parameter(torch.zeros(2, 2), requires_grad=False)


def test_reference_decays_everything():
    opt = build_optimizer(_Net(), OptimizerConfig(), "cpu")
    assert len(opt.param_groups) == 1
    g = opt.param_groups[0]
    assert g["weight_decay"] == 0.05 and g["lr"] == 3e-4 and g["betas"] == (0.9, 0.999)
    assert g["eps"] == 1e-8 and len(g["params"]) == 6  # frozen one left out
    assert g["fused"]


def test_switch_excludes_biases_norms_and_1d():
    net = _Net()
    opt = build_optimizer(net, OptimizerConfig(decay_norms_and_biases=False, fused=False), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == ids([net.fc.weight, net.pos])
    assert ids(no_decay["params"]) == ids([net.fc.bias, net.norm.weight, net.norm.bias, net.temp])


def test_fused_default_follows_device():
    assert build_optimizer(_Net(), OptimizerConfig(), "cuda").defaults["fused"]
    assert build_optimizer(_Net(), OptimizerConfig(), "cpu").defaults["fused"]
    unfused = build_optimizer(_Net(), OptimizerConfig(fused=False), "cpu").defaults
    assert not unfused["fused"] and unfused["foreach"]


def _lrs(cfg, steps, peak=3e-4, steps_per_epoch=10, total=40):
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=peak)
    sched = build_lr_scheduler(opt, cfg, peak, steps_per_epoch, total)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out, opt, sched


def test_step_schedule_exact_numbers():
    cfg = LRSchedulerConfig(
        name="step", warmup_steps=4, warmup_lr=1e-6, decay_rate=0.9, min_lr=2.2e-4
    )
    lrs, _, _ = _lrs(cfg, 31)
    warm = [1e-6 + (3e-4 - 1e-6) * i / 4 for i in range(4)]
    assert lrs[:4] == warm  # bit-exact: absolute values, not factors of the base LR
    assert lrs[1] == 1e-6 + (3e-4 - 1e-6) * 0.25
    assert lrs[4:10] == [3e-4] * 6  # rest of epoch 0 at the peak
    assert lrs[10:20] == [3e-4 * 0.9] * 10  # epoch 1: 2.7e-4
    assert lrs[20:30] == [3e-4 * 0.9**2] * 10  # epoch 2: 2.43e-4
    assert lrs[30] == 2.2e-4  # epoch 3: 2.187e-4 is under the floor


def test_step_schedule_floor_and_warmup_only_in_first_epoch():
    cfg = LRSchedulerConfig(
        name="step", warmup_steps=15, warmup_lr=0.0, decay_rate=0.5, min_lr=1e-4
    )
    lrs, _, _ = _lrs(cfg, 40)
    assert lrs[9] == 3e-4 * 9 / 15  # still warming up at the end of epoch 0
    assert lrs[10] == 1.5e-4  # epoch 1: warmup cut off, as in the reference
    assert lrs[20] == 1e-4 and lrs[39] == 1e-4  # floor: max(1e-4, 7.5e-5)


def test_reference_vit_b_numbers():
    cfg = LRSchedulerConfig()  # warmup 3000 from 1e-6, decay 0.9, min 1e-6
    f = lambda s: lr_at_step(s, cfg, 3e-4, steps_per_epoch=5000, total_steps=100000)  # noqa: E731
    assert f(0) == 1e-6
    assert f(1500) == pytest.approx(1.505e-4, rel=1e-12)
    assert f(3000) == 3e-4 and f(4999) == 3e-4
    assert f(5000) == pytest.approx(2.7e-4, rel=1e-12)
    assert f(19 * 5000) == pytest.approx(3e-4 * 0.9**19, rel=1e-12)


def test_cosine_schedule_exact_numbers():
    cfg = LRSchedulerConfig(name="cosine", warmup_steps=4, warmup_lr=0.0, min_lr=1e-5)
    lrs, _, _ = _lrs(cfg, 44, total=24)
    assert lrs[:4] == [0.0, 7.5e-5, 1.5e-4, 2.25e-4]
    assert lrs[4] == 3e-4
    assert lrs[14] == pytest.approx(1e-5 + 0.5 * (3e-4 - 1e-5), rel=1e-12)  # halfway
    assert lrs[9] == 1e-5 + 0.5 * (3e-4 - 1e-5) * (1 + math.cos(math.pi * 5 / 20))
    assert lrs[24] == pytest.approx(1e-5, rel=1e-12) and lrs[43] == lrs[24]
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


@pytest.mark.parametrize("name", ["step", "cosine"])
def test_resume_is_exact(name):
    cfg = LRSchedulerConfig(name=name, warmup_steps=4)
    straight, _, _ = _lrs(cfg, 30)
    _, _, first = _lrs(cfg, 13)
    state = first.state_dict()
    assert state == {"step": 13}
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=3e-4)
    sched = build_lr_scheduler(opt, cfg, 3e-4, 10, 40)
    sched.load_state_dict(state)
    resumed = []
    for _ in range(17):
        resumed.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert resumed == straight[13:]
    assert sched.last_epoch == 30


def test_all_groups_follow_schedule():
    cfg = LRSchedulerConfig(warmup_steps=2, warmup_lr=0.0)
    opt = build_optimizer(_Net(), OptimizerConfig(decay_norms_and_biases=False), "cpu")
    sched = build_lr_scheduler(opt, cfg, 3e-4, 10, 40)
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [1.5e-4, 1.5e-4]


def test_bad_names():
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="lr_scheduler.name"):
        build_lr_scheduler(opt, LRSchedulerConfig(name="linear"), 1e-3, 10, 10)  # type: ignore[arg-type]


def test_epoch_cosine_is_constant_within_an_epoch_and_resumes():
    from blip_recipes.training.optim import EpochCosineLR

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-5)
    schedule = EpochCosineLR(optimizer, peak_lr=1e-5, min_lr=0.0, steps_per_epoch=3, epochs=6)
    lrs = []
    for _ in range(18):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    expected = [0.5 * 1e-5 * (1 + math.cos(math.pi * (i // 3) / 6)) for i in range(18)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[0] == 1e-5 and lrs[3] < 1e-5
    resumed = EpochCosineLR(torch.optim.AdamW([param], lr=1e-5), 1e-5, 0.0, 3, 6)
    resumed.load_state_dict({"step": 7})
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(expected[7], rel=1e-12)


def test_alpha_ramps_linearly_to_its_final_value():
    from blip_recipes.training.optim import alpha_at_step

    assert [alpha_at_step(s, 0.4, 4) for s in (0, 1, 2, 4, 9)] == pytest.approx(
        [0, 0.1, 0.2, 0.4, 0.4]
    )
    assert alpha_at_step(0, 0.4, 0) == 0.4  # no ramp
