"""ivvae eval: per-frame and per-position scores, the same-size baseline, table and plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ivvae.cli import main
from ivvae.train.evaluate import (
    Scores,
    VideoReport,
    baseline_reconstruct,
    best_baseline,
    figure,
    group_position,
    load_video,
    ordinal,
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
    captured = capsys.readouterr()
    table = captured.out
    # Progress on stderr says what is being done, step by step.
    for step in ("clip.mp4: decoding", "in float32", "in bfloat16", "baseline", "4/4"):
        assert step in captured.err, captured.err
    assert "| ivvae float32 |" in table and "| baseline |" in table and "pos 4" in table
    report = json.loads((out / "eval.json").read_text())[0]
    assert report["frames"] == 10
    res = report["results"]
    assert set(res) == {"ivvae float32", "ivvae bfloat16", "baseline"}
    assert len(res["ivvae float32"]["per_frame_psnr"]) == 10
    assert set(res["ivvae float32"]["by_position"]) == {"0", "1", "2", "3", "4"}
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "eval.html").read_text()
    assert "| ivvae" not in page and "<table>" in page and "ivvae float32" in page
    assert "http://" not in page and "https://" not in page  # self-contained
    # The charts, and three frames (first, worst, middle) x original / reconstruction / diff.
    assert page.count("<img") == 1 + 3 * 3 and "reconstruction" in page
    assert "difference| x 4" in page


@pytest.mark.parametrize("emulated", [True, False])
def test_eval_compares_bfloat16_by_default_only_where_it_is_not_emulated(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        emulated: bool) -> None:
    # On an AVX2 CPU the default float32 + bfloat16 eval of 9 frames took 8 minutes, 13 s
    # of it float32's, and said nothing of why.
    from ivvae.model import precision

    monkeypatch.setattr(precision, "cpu_bfloat16_is_emulated", lambda: emulated)
    weights = write_tiny_weights(tmp_path / "tiny.safetensors")
    clip = tmp_path / "clip.mp4"
    media.make_video(clip, frames=5, width=16, height=16)
    out = tmp_path / "eval"
    assert main(["eval", str(clip), "--weights", str(weights), "--out", str(out)]) == 0
    results = json.loads((out / "eval.json").read_text())[0]["results"]
    assert ("ivvae bfloat16" in results) is not emulated
    assert "emulated" not in capsys.readouterr().err
    assert main(["eval", str(clip), "--weights", str(weights), "--precision", "bfloat16",
                 "--out", str(out)]) == 0
    assert ("emulated on this CPU" in capsys.readouterr().err) is emulated


def test_ordinals() -> None:
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 14, 21, 22, 23, 101, 111)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "14th", "21st", "22nd", "23rd",
        "101st", "111th"]


def _report() -> VideoReport:
    rng = np.random.default_rng(0)
    psnr = list(24 + rng.random(17))
    rep = VideoReport("clip.mp4", 17, 32, 24, 1000)
    rep.results = {"ivvae float32": Scores(psnr, [0.8] * 17),
                   "ivvae bfloat16": Scores([p - 0.02 for p in psnr], [0.79] * 17),
                   "baseline": Scores([p - 1 for p in psnr], [0.75] * 17)}
    return rep


def test_plot_shows_every_line_ssim_and_bars_from_zero() -> None:
    import matplotlib.pyplot as plt

    fig = figure([_report()])
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
        ax_psnr, ax_ssim, bars_psnr, bars_ssim = fig.axes[:4]
        # fp32 and bf16 (0.02 dB apart) are told apart by width: neither hides the other.
        lines = {line.get_label(): line for line in ax_psnr.get_lines()
                 if not str(line.get_label()).startswith("_")}
        assert set(lines) == {"ivvae float32", "ivvae bfloat16", "baseline"}
        widths = {k: v.get_linewidth() for k, v in lines.items()}
        assert widths["ivvae float32"] > 2 * widths["ivvae bfloat16"]
        assert lines["ivvae bfloat16"].get_zorder() > lines["ivvae float32"].get_zorder()
        assert lines["baseline"].get_linestyle() == "--"
        assert ax_ssim.get_ylabel() == "SSIM" and len(ax_ssim.get_lines()) >= 3
        assert bars_ssim.get_ylabel() == "SSIM"
        for ax in (bars_psnr, bars_ssim):
            assert ax.get_ylim()[0] == 0
        # No legend covers a bar or a line's axes.
        for ax in (ax_psnr, bars_psnr):
            legend = ax.get_legend()
            assert legend is not None
            box = legend.get_window_extent(renderer)
            for other in (ax_psnr, ax_ssim, bars_psnr, bars_ssim):
                assert not box.overlaps(other.get_window_extent(renderer))
    finally:
        plt.close(fig)


def test_bfloat16_counts_as_native_only_with_avx512_bf16_or_amx(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # oneDNN's own check says yes on any AVX512 CPU (Skylake), which emulates bfloat16.
    import torch

    from ivvae.model.precision import cpu_bfloat16_is_emulated

    for avx512_bf16, amx, emulated in [(False, False, True), (True, False, False),
                                       (False, True, False)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True,
                            raising=False)
        assert cpu_bfloat16_is_emulated() is emulated
