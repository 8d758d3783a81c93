"""The benchmark scripts run end to end at their smallest size (their figures are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.ray
def test_train_throughput_smoke(tmp_path):
    out = tmp_path / "train.json"
    # Ray Train start-up alone is 10-25 s here; the limit only stops a hung run.
    proc = subprocess.run(
        [sys.executable, "benchmarks/train_throughput.py", "--smoke", "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "samples/s" in proc.stdout and "ray/plain" in proc.stdout
    results = json.loads(out.read_text())
    assert results["machine"]["cpu_count"] >= 1
    (step,) = results["step_throughput"]
    assert step["samples_per_s"] > 0 and step["train_gflop_per_sample"] > step["forward_gflop_per_sample"] > 0
    overhead = results["ray_overhead"]
    assert overhead["torch_threads_plain"] == overhead["torch_threads_ray_worker"]
    assert len(overhead["ray_epochs"]) == overhead["epochs"] == 2
    assert overhead["ray_in_loop_samples_per_s"] > 0 and overhead["plain_in_loop_samples_per_s"] > 0
    assert overhead["in_loop_ratio_ray_over_plain"] > 0 and overhead["ray_wall_s"] > 0
