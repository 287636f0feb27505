"""init_distributed / shutdown_distributed: plain process, and torchrun with 2 ranks (exit code 0)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

from blip_recipes.parallel import init_distributed, resolve_device_type, shutdown_distributed


def test_single_process_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed("cpu")
    try:
        assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
        assert info.device == torch.device("cpu") and info.is_main
        assert dist.is_initialized() and dist.get_backend() == "gloo"
        assert info.mesh.mesh_dim_names == ("dp_shard",) and info.mesh.size() == 1
        t = torch.ones(2)
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0]
    finally:
        shutdown_distributed()
    assert not dist.is_initialized()
    shutdown_distributed()  # second call is a no-op


def test_resolve_device_type():
    assert resolve_device_type("cpu") == "cpu"
    assert resolve_device_type("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device_type("cuda")


SCRIPT = textwrap.dedent(
    """
    import torch, torch.distributed as dist
    from blip_recipes.parallel import init_distributed, shutdown_distributed, apply_fsdp
    from blip_recipes.parallel.distributed import build_data_parallel_mesh
    info = init_distributed("cpu", timeout_s=77)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8))
    apply_fsdp(model, list(model), info.mesh)
    model(torch.ones(2, 8)).sum().backward()
    t = torch.tensor([float(info.rank)])
    dist.all_reduce(t)
    print(f"rank={info.rank} world={info.world_size} local={info.local_rank} sum={t.item()}")
    del model
    def seconds(group):
        return int(group._get_backend(torch.device("cpu")).options._timeout.total_seconds())
    for layout in ("fsdp", "hsdp", "ddp"):  # hsdp and ddp: (2, 1) meshes, size-1 shard groups
        mesh, dp_group = build_data_parallel_mesh("cpu", 2, layout, dp_replicate=2)
        waits = sorted({seconds(dp_group), *(seconds(g) for g in mesh.get_all_groups())})
        print(f"rank={info.rank} {layout} group timeouts {waits}")
    shutdown_distributed()
    """
)


def test_torchrun_two_ranks_exit_cleanly(tmp_path):
    """Two torchrun ranks train a step under FSDP2 and exit 0; every group of each layout's mesh
    waits at most job.collective_timeout_s (a group made without a timeout would wait torch's
    30 minutes for a stalled peer)."""
    script = tmp_path / "dist_script.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--standalone", str(script)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank=0 world=2 local=0 sum=1.0" in result.stdout
    assert "rank=1 world=2 local=1 sum=1.0" in result.stdout
    for layout in ("fsdp", "hsdp", "ddp"):
        assert f"rank=1 {layout} group timeouts [77]" in result.stdout, result.stdout
