import time

import pytest
import torch
from torch import nn
from torch.profiler import record_function

from blip_recipes.benchmarking.profiling import PARTS, profile_steps
from blip_recipes.benchmarking.timing import StepTimer


def test_cpu_timer_statistics():
    timer = StepTimer(torch.device("cpu"))
    for _ in range(3):
        timer.start()
        time.sleep(0.01)
        timer.stop()
    s = timer.summary(samples_per_step=4)
    assert s.timer == "perf_counter" and s.steps == 3
    assert 9 <= s.step_ms_min <= s.step_ms_mean <= s.step_ms_max
    assert s.samples_per_sec == pytest.approx(12 / s.window_s)


def test_time_split_attributes_forward_and_backward_to_ranges():
    torch.manual_seed(0)
    vit, lm = nn.Linear(256, 256), nn.Linear(256, 256)
    opt = torch.optim.SGD([*vit.parameters(), *lm.parameters()], lr=0.1)
    x = torch.randn(512, 256)

    def step():
        with record_function("bench/vit"):
            h = torch.relu(vit(x))
        with record_function("bench/lm"):
            loss = lm(h).square().mean()
        loss.backward()
        with record_function("bench/optimizer"):
            opt.step()
            opt.zero_grad()

    split = profile_steps(step, steps=2, device=torch.device("cpu"))
    assert set(split["per_step_ms"]) == set(PARTS)
    assert split["basis"] == "cpu_self"
    for part in ("vit", "lm"):
        assert split["forward_ms"][part] > 0 and split["backward_ms"][part] > 0
    assert split["per_step_ms"]["optimizer"] > 0
    assert split["backward_ms"]["other"] < 0.2 * sum(split["backward_ms"].values())
    assert sum(split["fraction"].values()) == pytest.approx(1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_event_timer_and_kernel_time_split():
    device = torch.device("cuda")
    a = torch.randn(4096, 4096, device=device, requires_grad=True)
    timer = StepTimer(device)
    for _ in range(3):
        timer.start()
        (a @ a).sum().backward()
        timer.stop()
    s = timer.summary(samples_per_step=1)
    assert s.timer == "cuda_event" and s.step_ms_mean > 0

    def step():
        with record_function("bench/vit"):
            loss = (a @ a).sum()
        loss.backward()

    split = profile_steps(step, steps=2, device=device)
    assert split["basis"] == "cuda_kernels"
    assert split["forward_ms"]["vit"] > 0 and split["backward_ms"]["vit"] > 0
