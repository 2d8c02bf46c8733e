"""ivvae eval: per-frame and per-position scores, the same-size baseline, table and plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ivvae.cli import main
from ivvae.train.evaluate import (
    baseline_reconstruct,
    best_baseline,
    group_position,
    load_video,
    quantize,
    score,
)
from tests import media
from tests.service_fixtures import write_tiny_weights


def test_group_positions() -> None:
    assert [group_position(i) for i in range(10)] == [0, 1, 2, 3, 4, 1, 2, 3, 4, 1]


def test_baseline_is_exact_without_compression_and_respects_budget(tmp_path: Path) -> None:
    path = tmp_path / "v.mp4"
    media.make_video(path, frames=9, width=32, height=24)
    video = load_video(path)
    recon, values = baseline_reconstruct(video, 1, 1)
    assert values == video.numel()
    assert torch.allclose(quantize(recon), quantize(video), atol=1e-6)
    assert min(score(recon, video).psnr) > 60
    label, sc, used = best_baseline(video, budget=video.numel() // 48)
    assert used <= video.numel() // 48
    assert 10 < sc.mean_psnr < 60 and "bicubic" in label


def test_eval_cli_writes_table_json_and_plot(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    weights = write_tiny_weights(tmp_path / "tiny.safetensors")
    clip = tmp_path / "clip.mp4"
    media.make_video(clip, frames=10, width=24, height=16)
    out = tmp_path / "eval"
    assert main(["eval", str(clip), "--weights", str(weights), "--precision", "float32",
                 "bfloat16", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| ivvae float32 |" in table and "| baseline |" in table and "pos 4" in table
    report = json.loads((out / "eval.json").read_text())[0]
    assert report["frames"] == 10
    res = report["results"]
    assert set(res) == {"ivvae float32", "ivvae bfloat16", "baseline"}
    assert len(res["ivvae float32"]["per_frame_psnr"]) == 10
    assert set(res["ivvae float32"]["by_position"]) == {"0", "1", "2", "3", "4"}
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
