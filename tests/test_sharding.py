"""`Engine(devices=4)`: a batch sharded over a 'data' mesh of 4 virtual CPU devices (subprocess: the device
count must be set before jax starts) against one device, row for row (bench/bench_sharded.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import GOLDEN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_batch_of_8_sharded_over_4_devices_equals_one_device():
    if not os.path.isdir(os.path.join(GOLDEN, "cosyvoice3", "modeldir")):
        pytest.skip("tiny CV3 model folder absent")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", COSYJAX_GOLDEN=GOLDEN,
               JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_sharded.py"), "--devices", "4",
                        "--batch", "8", "--reps", "1"], capture_output=True, text=True, env=env, timeout=1200)
    print(p.stdout)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "mesh {'data': 4}" in p.stdout
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("max per-row rel-L2 sharded vs one device in")][0]
    assert float(line.rsplit(":", 1)[1]) <= 1e-6
    # against one call with all 8 rows on one device: XLA CPU rounds batch-8 and batch-2 programs differently
    line = [ln for ln in p.stdout.splitlines() if "(batch 8 in one call)" in ln][0]
    assert float(line.rsplit(":", 1)[1]) <= 1e-4
