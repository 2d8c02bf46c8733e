"""``bench/bench_model.py --quick`` runs end to end and prints its report (no timing checks).

The side-by-side run against the official code needs its ``models/vae3d.py``, which the
project never ships: ``IVVAE_OFFICIAL_VAE3D=/path/to/models/vae3d.py`` turns that test on.
"""

from __future__ import annotations

import os
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
    assert "official comparison: skipped" in out


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("IVVAE_OFFICIAL_VAE3D"),
                    reason="IVVAE_OFFICIAL_VAE3D (the official models/vae3d.py) not set")
def test_quick_bench_against_the_official_code() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--official-memory", "--official",
         os.environ["IVVAE_OFFICIAL_VAE3D"]],
        capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for row in ("official encode float32", "official decode float32",
                "ours fp32 vs official fp32", "ours bf16 vs official fp32",
                "official: encode memory"):
        assert row in out
    line = next(x for x in out.splitlines() if x.startswith("official vs ours"))
    latent_diff = float(line.split("latent max |diff| ")[1].split(",")[0])
    assert latent_diff <= 1e-4


def test_bench_names_a_missing_official_file(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--official", str(tmp_path / "nope.py")],
        capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode != 0
    assert "no such file" in proc.stderr
