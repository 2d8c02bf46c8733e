"""The CLI's encode/decode work without a server and write the same files as HTTP."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ivvae import __version__
from ivvae.cli import DEBUG_ENV, build_parser, main
from ivvae.config import Settings
from ivvae.latents import decode_latent_file
from ivvae.safetensors_io import loads
from ivvae.video import open_video
from tests import media
from tests.redis_server import free_port
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
    assert not list(tmp_path.glob("*.tmp"))


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
    assert "\n  --port: Input should be less than" in str(exc.value)


def test_an_invalid_setting_is_named_by_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    # Where the operator wrote it: the variable (the option where one was given).
    monkeypatch.setenv("IVVAE_LOG_LEVEL", "verbose")
    with pytest.raises(SystemExit) as exc:
        main(["serve"])
    assert "\n  IVVAE_LOG_LEVEL: 'verbose' is not a log level" in str(exc.value)


# -- one error style ------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``ivvae ARGS`` in a child process, as a user runs it (what it prints, its exit code)."""
    full = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "ivvae.cli", *args], capture_output=True,
                          text=True, env=full, timeout=timeout)


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_user_errors_are_one_line_and_a_nonzero_exit(tmp_path: Path, tiny_weights: Path,  # noqa: F811
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "missing.mp4"
    clip = tmp_path / "clip.mp4"
    media.make_video(clip, frames=5, width=16, height=16)
    cases: list[tuple[list[str], str]] = [
        (["encode", str(missing), "--weights", str(tiny_weights)], "missing.mp4"),
        (["eval", str(clip), "--weights", str(tmp_path / "nope.safetensors")], "nope"),
        (["decode", str(tmp_path / "missing.latent.safetensors"), "-o",
          str(tmp_path / "out.mp4")], "missing.latent"),
    ]
    for argv, named in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert named in _one_error_line(err), err
    monkeypatch.setenv("IVVAE_WEIGHTS", str(tmp_path / "gone.safetensors"))
    assert main(["encode", str(clip), "--no-progress"]) == 2
    assert "gone.safetensors" in _one_error_line(capsys.readouterr().err)
    assert not list(tmp_path.glob("*.latent.safetensors"))


def test_a_traceback_only_with_debug(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.mp4")
    plain = _cli("encode", missing)
    assert plain.returncode == 2
    assert _one_error_line(plain.stderr).startswith("ivvae encode: error: ")
    for debug in (_cli("encode", missing, "--debug"), _cli("--debug", "encode", missing),
                  _cli("encode", missing, env={DEBUG_ENV: "1"})):
        assert debug.returncode != 0 and "Traceback" in debug.stderr, debug.stderr


def test_version_and_every_option_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"ivvae {__version__}"
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    undocumented = [
        f"{name} {action.option_strings or action.dest}"
        for name, sub in commands.choices.items() for action in sub._actions
        if not action.help and not isinstance(action, argparse._HelpAction)
    ]
    assert not undocumented, undocumented
    encode_flags = {f for a in commands.choices["encode"]._actions for f in a.option_strings}
    decode_flags = {f for a in commands.choices["decode"]._actions for f in a.option_strings}
    assert "--encode-precision" in encode_flags and "--decode-precision" not in encode_flags
    assert "--decode-precision" in decode_flags and "--encode-precision" not in decode_flags


def test_decode_writes_the_container_its_suffix_names_or_refuses(
        tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    clip = tmp_path / "clip.mp4"
    media.make_video(clip, frames=5, width=16, height=16)
    latent = tmp_path / "clip.latent.safetensors"
    assert main(["encode", str(clip), "-o", str(latent), "--weights", str(tiny_weights),
                 "--no-progress"]) == 0
    capsys.readouterr()
    for name in ("out.webm", "out.mkv", "out"):
        target = tmp_path / name
        assert main(["decode", str(latent), "-o", str(target), "--weights", str(tiny_weights),
                     "--no-progress"]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert name in line and ".mp4" in line and ".safetensors" in line
        assert not target.exists()
    upper = tmp_path / "OUT.MP4"
    assert main(["decode", str(latent), "-o", str(upper), "--weights", str(tiny_weights),
                 "--no-progress"]) == 0
    with open_video(upper) as reader:
        assert reader.info.codec == "h264" and reader.read_all().shape == (5, 16, 16, 3)
    assert not list(tmp_path.glob("*.tmp"))


def test_serve_on_a_busy_port_is_a_one_line_error(tiny_weights: Path,  # noqa: F811
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--weights", str(tiny_weights), "--port", str(port),
                     "--grpc-port", str(free_port())]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert f"port {port}" in line and "HTTP" in line and "in use" in line
        assert main(["serve", "--weights", str(tiny_weights), "--port", str(free_port()),
                     "--grpc-port", str(port)]) == 2
        assert "gRPC" in _one_error_line(capsys.readouterr().err)


def test_triton_serve_checks_its_ports_before_exporting(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        workdir = tmp_path / "triton"
        assert main(["triton-serve", "--workdir", str(workdir), "--http-port", str(port),
                     "--grpc-port", str(free_port()), "--metrics-port", str(free_port())]) == 2
        assert f"port {port}" in _one_error_line(capsys.readouterr().err)
        assert not (workdir / "artifacts").exists()  # nothing was exported


def test_default_ports_of_serve_triton_serve_and_stack_do_not_collide() -> None:
    parser = build_parser()
    settings = Settings()
    gateway = {settings.port, settings.grpc_port}
    triton = parser.parse_args(["triton-serve"])
    local_triton = {triton.http_port, triton.grpc_port, triton.metrics_port}
    stack = parser.parse_args(["stack", "status"])
    stack_ports = [stack.http_port, stack.grpc_port, stack.redis_port, stack.triton_http_port,
                   stack.triton_grpc_port, stack.triton_metrics_port]
    assert not gateway & local_triton
    assert len(set(stack_ports)) == len(stack_ports)
    # The gateway's default Triton endpoint is where `ivvae triton-serve` listens.
    assert settings.triton_url.rsplit(":", 1)[1] == str(triton.grpc_port)
    assert {stack.http_port, stack.grpc_port} == gateway


def test_ctrl_c_during_encode_is_one_line_and_leaves_no_file(tmp_path: Path,
                                                            tiny_weights: Path) -> None:  # noqa: F811
    clip = tmp_path / "long.mp4"
    media.make_video(clip, frames=1500, width=64, height=64)
    out = tmp_path / "long.latent.safetensors"
    _stop_mid_run(["encode", str(clip), "-o", str(out), "--weights", str(tiny_weights),
                   "--groups-per-step", "1"], signal.SIGINT)
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def _stop_mid_run(argv: list[str], signum: int) -> None:
    """Run ``ivvae ARGV``, send ``signum`` once its progress bar is up (the work is under
    way), and check that it ends as an interrupt: exit 130, one line, no traceback."""
    env = dict(os.environ)
    env.pop(DEBUG_ENV, None)
    proc = subprocess.Popen([sys.executable, "-m", "ivvae.cli", *argv],
                            stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    seen = ""
    while "frame" not in seen:
        char = proc.stderr.read(1)
        assert char, f"{argv[0]} ended before it could be stopped: {seen}"
        seen += char
    proc.send_signal(signum)
    rest = proc.stderr.read()
    assert proc.wait(60) == 130, seen + rest
    assert "Traceback" not in rest and "ivvae: interrupted" in rest, rest


def test_encode_progress_knows_the_total_from_the_header(tmp_path: Path,
                                                         tiny_weights: Path,  # noqa: F811
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    clip = tmp_path / "clip.mp4"
    media.make_video(clip, frames=13, width=16, height=16)
    assert main(["encode", str(clip), "--weights", str(tiny_weights)]) == 0
    bar = capsys.readouterr().err
    assert "13/13" in bar and "0/13" in bar, bar


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
    # float frames: the model's own decode, for the batch and for the latent file
    from tests.service_fixtures import model_video

    assert main(["decode", str(bare), "-o", str(frames), "--weights", str(tiny_weights),
                 "--no-progress", "--frames-dtype", "float32"]) == 0
    tensors, meta = loads(frames.read_bytes())
    video = model_video(tiny_weights, np.concatenate([latent, latent, latent]))
    assert tensors["frames"].dtype == "F32" and meta["layout"] == "BTHWC float32 RGB [-1, 1]"
    assert np.abs(tensors["frames"].array - video.transpose(0, 2, 3, 4, 1)).max() <= 1e-4
    assert main(["decode", str(out), "-o", str(frames), "--weights", str(tiny_weights),
                 "--no-progress", "--frames-dtype", "float32"]) == 0
    assert np.abs(loads(frames.read_bytes())[0]["frames"].array
                  - video[0].transpose(1, 2, 3, 0)).max() <= 1e-4
    assert main(["decode", str(out), "-o", str(tmp_path / "x.mp4"), "--weights",
                 str(tiny_weights), "--no-progress", "--frames-dtype", "float32"]) == 2
    assert "uint8" in capsys.readouterr().err


def test_sigterm_during_decode_ends_it_as_ctrl_c_does(tmp_path: Path,
                                                     tiny_weights: Path) -> None:  # noqa: F811
    # A job scheduler stops with SIGTERM: the half-written MP4 must go, as on Ctrl-C.
    clip = tmp_path / "long.mp4"
    media.make_video(clip, frames=801, width=64, height=64)
    latent = tmp_path / "long.latent.safetensors"
    assert main(["encode", str(clip), "-o", str(latent), "--weights", str(tiny_weights),
                 "--no-progress"]) == 0
    out = tmp_path / "long.mp4.out.mp4"
    _stop_mid_run(["decode", str(latent), "-o", str(out), "--weights", str(tiny_weights)],
                  signal.SIGTERM)
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_outputs_that_would_lose_data_or_cannot_be_written_are_named(
        tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    import torch

    clip = tmp_path / "clip.mp4"
    media.make_video(clip, frames=5, width=16, height=16)
    original = clip.read_bytes()
    weights = ["--weights", str(tiny_weights), "--no-progress"]
    latent = tmp_path / "c.latent.safetensors"
    assert main(["encode", str(clip), "-o", str(latent), *weights]) == 0
    frames = tmp_path / "f.safetensors"
    long_name = tmp_path / ("a" * 240 + ".safetensors")  # 252 bytes: legal, near the limit
    assert main(["encode", str(clip), "-o", str(long_name), *weights]) == 0
    assert long_name.is_file()
    capsys.readouterr()
    cases: list[tuple[list[str], str]] = [
        (["encode", str(clip), "-o", str(clip)], "is the input"),
        (["encode", str(clip), "-o", str(tmp_path / "." / "clip.mp4")], "is the input"),
        (["decode", str(latent), "-o", str(latent)], "is the input"),
        (["encode", str(clip), "-o", "-"], "standard output"),
        (["encode", str(clip), "-o", str(tmp_path / "no" / "such" / "x.safetensors")],
         f"the output's folder {tmp_path / 'no' / 'such'} does not exist"),
        (["encode", str(clip), "-o", str(tmp_path)], f"the output {tmp_path} is a folder"),
        (["encode", str(tmp_path)], "(it is a folder)"),
        (["decode", str(latent), "-o", str(frames), "--device", "bogus"],
         "device must be cpu, cuda or cuda:N, got 'bogus'"),
    ]
    if not torch.cuda.is_available():
        cases.append((["encode", str(clip), "-o", str(frames), "--device", "cuda"],
                      "sees no CUDA GPU"))
    for argv, says in cases:
        assert main([*argv, *weights]) == 2, argv
        assert says in _one_error_line(capsys.readouterr().err), argv
    assert clip.read_bytes() == original
    assert not frames.exists() and not list(tmp_path.glob("*.tmp"))


def test_serve_help_states_the_settings_defaults() -> None:
    # The service options pass None so that Settings decides; their help says the default,
    # which must be Settings' own (the CLI does not import pydantic to build its parser).
    import re

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = sub.choices["serve"]
    said = {a.dest: re.search(r"\(default: ([^,)]+)", a.help or "")
            for a in serve._actions}
    fields = Settings.model_fields
    checked = 0
    for dest, field in (("host", "host"), ("port", "port"), ("grpc_port", "grpc_port"),
                        ("device", "device"), ("encode_precision", "encode_precision"),
                        ("decode_precision", "decode_precision"),
                        ("groups_per_step", "groups_per_step"), ("triton_url", "triton_url")):
        match = said[dest]
        assert match is not None, f"--{dest} states no default"
        assert match.group(1) == str(fields[field].default), dest
        checked += 1
    assert checked == 8
