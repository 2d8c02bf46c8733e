"""Conformance with the official implementation (golden vectors), through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from ivvae.cli import main
from tests.conftest import GOLDEN_FILES


def test_golden_files_are_present() -> None:
    assert len(GOLDEN_FILES) >= 2


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: p.stem)
def test_verify_golden_passes(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify-golden", str(path)]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["passed"] is True
    for key in ("mu", "logvar", "latent", "recon"):
        assert line[f"max_abs_{key}"] <= 1e-4


def test_verify_golden_fails_on_perturbed_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = GOLDEN_FILES[0]
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(src))
    key = "state_dict.decoder.head.2.conv_2d.bias"
    tensors[key] = tensors[key] + 1e-2
    bad = tmp_path / "perturbed.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    assert main(["verify-golden", str(bad)]) == 1
    line = json.loads(capsys.readouterr().out.strip())
    assert line["passed"] is False
    assert line["max_abs_recon"] > 1e-4
    assert line["max_abs_mu"] <= 1e-4  # the encoder is untouched
