"""tools/h200_check.sh dry-run on the CPU: the device run's phases on the tiny model, end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PHASES = {
    "switches": ["baseline-hf-fp32", "eager-bf16", "eager-bf16-autocast", "eager-bf16-kvrecompute",
                 "eager-bf16-lmfull", "eager-bf16-rsperuse", "eager-bf16-unfused",
                 "eager-bf16-objeager"],
    "large": ["eager-bf16", "eager-bf16-float8-tensorwise"],
    "split": ["eager-bf16"],
    "loader": ["eager-bf16"],
}  # fmt: skip


@pytest.mark.slow
def test_dry_run_writes_each_phase_and_prints_one_table(tmp_path):
    results = tmp_path / "results"
    env = {**os.environ, "DRY": "1", "PY": sys.executable, "RESULTS": str(results),
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run(["bash", "tools/h200_check.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1500)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| h200-")]
    for phase, names in PHASES.items():
        report = json.loads((results / f"h200-{phase}.json").read_text())
        assert report["meta"]["model"] == "blip_pretrain_tiny" and report["meta"]["device"] == "cpu"
        runs = report["results"]
        assert [r["name"] for r in runs] == names, phase
        for run in runs:
            assert run.get("error") is None and run["samples_per_sec"] > 0, (phase, run["name"])
            assert any(line.startswith(f"| h200-{phase} | {run['name']} | ") for line in table)
        if phase == "split":
            assert runs[0]["profile"]["per_step_ms"]["vit"] > 0
        if phase == "loader":
            assert 0 < runs[0]["data_wait_frac"] < 1
    assert len(table) == sum(len(names) for names in PHASES.values())
    assert "rc=0" in proc.stdout and "rc=1" not in proc.stdout
