"""``bench/bench_model.py --quick`` runs end to end and prints its report (no timing checks)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_model.py"


@pytest.mark.slow
def test_quick_bench_prints_the_table() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for row in ("model encode float32", "model decode float32", "model encode bfloat16",
                "model decode bfloat16", "dense conv3d float32", "dense conv3d bfloat16"):
        assert row in out
    for ratio in ("model fp32 encode / dense fp32", "model fp32 decode / dense fp32",
                  "bf16 speedup over fp32", "bf16 latent relative error", "peak RSS growth"):
        assert ratio in out
