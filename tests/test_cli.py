"""The CLI's encode/decode work without a server and write the same files as HTTP."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from ivvae.cli import main
from ivvae.latents import decode_latent_file
from ivvae.safetensors_io import loads
from ivvae.video import open_video
from tests import media
from tests.service_fixtures import running_app, tiny_settings, tiny_weights  # noqa: F401


def test_encode_decode_cli_matches_http(tmp_path: Path, tiny_weights: Path,  # noqa: F811
                                              capsys: pytest.CaptureFixture[str]) -> None:
    clip = tmp_path / "clip.mp4"
    media.make_video(clip, frames=7, width=21, height=13)
    latent_path = tmp_path / "clip.latent.safetensors"
    assert main(["encode", str(clip), "-o", str(latent_path), "--weights", str(tiny_weights),
                 "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["latent_shape"] == [1, 4, 3, 2, 3]
    cli_latent, info = decode_latent_file(latent_path.read_bytes())
    async def via_http() -> bytes:
        async with running_app(tiny_settings(tiny_weights)) as client:
            r = await client.post("/encode", content=clip.read_bytes(),
                                  headers={"content-type": "video/mp4"})
            return r.content

    http_latent, http_info = decode_latent_file(asyncio.run(via_http()))
    np.testing.assert_allclose(cli_latent, http_latent, rtol=0, atol=1e-6)
    assert info.content_sha256 == http_info.content_sha256

    out_mp4 = tmp_path / "recon.mp4"
    assert main(["decode", str(latent_path), "-o", str(out_mp4), "--weights",
                 str(tiny_weights), "--no-progress"]) == 0
    with open_video(out_mp4) as reader:
        assert reader.read_all().shape == (7, 13, 21, 3)
    out_frames = tmp_path / "recon.safetensors"
    assert main(["decode", str(latent_path), "-o", str(out_frames), "--weights",
                 str(tiny_weights), "--no-progress"]) == 0
    tensors, _ = loads(out_frames.read_bytes())
    assert tensors["frames"].shape == (7, 13, 21, 3)
    assert not list(tmp_path.glob("*.tmp-*"))


def test_cli_bad_input_exits_nonzero_with_message(tmp_path: Path, tiny_weights: Path,  # noqa: F811
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"definitely not a video")
    assert main(["encode", str(junk), "--weights", str(tiny_weights), "--no-progress"]) == 2
    assert "unsupported_media" in capsys.readouterr().err
    assert not (tmp_path / "junk.latent.safetensors").exists()


def test_invalid_settings_are_a_message_not_a_traceback(tmp_path: Path) -> None:
    cert = tmp_path / "server.crt"
    cert.write_text("not used")
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--tls-cert", str(cert)])
    assert "invalid settings" in str(exc.value) and "together" in str(exc.value)
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--port", "70000"])
    assert "port" in str(exc.value)


def test_encode_options_and_bare_latent_decode(tiny_weights: Path, tmp_path: Path,  # noqa: F811
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """``ivvae encode --options`` preprocesses; ``ivvae decode`` takes a bare latent batch."""
    import numpy as np

    from ivvae.latents import decode_latent_file
    from ivvae.safetensors_io import dumps, loads
    from tests.media import sample_clip

    out = tmp_path / "clip.latent.safetensors"
    assert main(["encode", str(sample_clip("carphone_pristine")), "-o", str(out),
                 "--weights", str(tiny_weights), "--no-progress",
                 "--options", "resize=32x32", "start_s=1", "num_frames=5"]) == 0
    latent, info = decode_latent_file(out.read_bytes())
    assert latent.shape == (1, 4, 2, 4, 4) and info.extra["preprocess"] == (
        "resize=32x32;start_s=1;num_frames=5")
    assert main(["encode", str(sample_clip("carphone_pristine")), "--weights",
                 str(tiny_weights), "--no-progress", "--options", "rezise=32"]) == 2
    assert "'rezise'" in capsys.readouterr().err
    bare = tmp_path / "sampled.safetensors"
    bare.write_bytes(dumps({"latent": np.concatenate([latent, latent, latent])}))
    frames = tmp_path / "sampled.frames.safetensors"
    assert main(["decode", str(bare), "-o", str(frames), "--weights", str(tiny_weights),
                 "--no-progress", "--options", "num_frames=4", "fps=8"]) == 0
    tensors, meta = loads(frames.read_bytes())
    assert tensors["frames"].shape == (3, 4, 32, 32, 3) and meta["fps"] == "8/1"
    assert main(["decode", str(out), "--weights", str(tiny_weights), "--no-progress",
                 "--options", "fps=8"]) == 2
    assert "bare latents" in capsys.readouterr().err
