"""ivvae.client over HTTP and gRPC, sync and asyncio: the same results either way, the
service's errors, retries with backoff, and no torch unless asked for."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ivvae.client import AsyncClient, Client, LatentResult, RetryPolicy
from ivvae.errors import BackendUnavailable, InvalidLatent, Unauthorized, UnsupportedMedia
from ivvae.video import open_video
from tests import media
from tests.grpc_fixtures import ServerThread, server_thread
from tests.service_fixtures import tiny_settings, tiny_weights  # noqa: F401

KEY = "client-key"
VIDEO = media.make_video(None, frames=6, width=24, height=16)
FAST_RETRY = RetryPolicy(attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)


@pytest.fixture(scope="module")
def server(tiny_weights: Path) -> Iterator[ServerThread]:  # noqa: F811
    with server_thread(tiny_settings(tiny_weights, api_keys=KEY), http=True) as srv:
        yield srv


@pytest.fixture(params=["grpc", "http"])
def url(request: pytest.FixtureRequest, server: ServerThread) -> str:
    return server.grpc_url if request.param == "grpc" else server.http_url


def test_encode_decode_models(url: str, server: ServerThread, tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(VIDEO)
    with Client(url, api_key=KEY) as client:
        from_path = client.encode(clip)
        from_bytes = client.encode(VIDEO, dtype="float16", moments=True)
        frames = client.decode(from_path, format="frames")
        mp4 = client.decode(from_path)
        models = client.models()
        assert models.encode_precision == "float32"
        assert client.healthy() and client.answers()
    assert from_path.latent_shape == (1, 4, 3, 2, 3)
    assert from_path.numpy().shape == from_path.latent_shape
    assert from_path.numpy().dtype == np.float32
    assert from_bytes.info.dtype == "float16" and from_bytes.numpy("mu").shape == (1, 4, 3, 2, 3)
    assert from_path.torch().shape == from_path.latent_shape
    assert isinstance(frames, np.ndarray) and frames.shape == (6, 16, 24, 3)
    assert frames.dtype == np.uint8
    assert isinstance(mp4, bytes)
    with open_video(mp4) as reader:
        assert reader.read_all().shape == (6, 16, 24, 3)
    assert models.names() == [server.service.backend.default_model]

    (tmp_path / "out").mkdir()
    saved = from_path.save(tmp_path / "out" / "clip.latent.safetensors")
    assert saved.read_bytes() == from_path.data
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]  # no temporary left
    assert LatentResult.load(saved).info == from_path.info


def test_transports_give_the_same_bytes(server: ServerThread) -> None:
    with Client(server.grpc_url, api_key=KEY) as g, Client(server.http_url, api_key=KEY) as h:
        a, b = g.encode(VIDEO, sample=True, seed=5), h.encode(VIDEO, sample=True, seed=5)
        assert a.data == b.data
        np.testing.assert_array_equal(g.decode(a.data, format="frames"),
                                      h.decode(a.data, format="frames"))


async def test_async_client(url: str) -> None:
    async with AsyncClient(url, api_key=KEY) as client:
        latent = await client.encode(VIDEO)
        frames = await client.decode(latent, format="frames")
        assert (await client.models()).default
        assert await client.healthy()
    assert latent.info.num_frames == 6
    assert isinstance(frames, np.ndarray) and frames.shape == (6, 16, 24, 3)


def test_service_errors_are_raised_as_ivvae_errors(url: str) -> None:
    with Client(url, api_key=KEY, retry=FAST_RETRY) as client:
        with pytest.raises(UnsupportedMedia):
            client.encode(np.random.default_rng(0).bytes(4000))
        with pytest.raises(InvalidLatent):
            client.decode(b"not a latent" * 20)
    with Client(url, api_key="wrong") as client, pytest.raises(Unauthorized):
        client.encode(VIDEO)


def test_unavailable_is_retried(url: str, server: ServerThread,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = server.service.pipeline
    real = pipeline.encode
    calls = 0

    async def flaky(*args: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise BackendUnavailable("the backend is restarting")
        return await real(*args, **kw)

    monkeypatch.setattr(pipeline, "encode", flaky)
    with Client(url, api_key=KEY, retry=FAST_RETRY) as client:
        assert client.encode(VIDEO).info.num_frames == 6
        assert calls == 3
        calls = -10  # fails every time from now on
        with pytest.raises(BackendUnavailable):
            client.encode(VIDEO)
    assert calls == -10 + FAST_RETRY.attempts


@pytest.mark.parametrize("url", ["grpc://127.0.0.1:9", "http://127.0.0.1:9"])
def test_no_server(url: str) -> None:
    with Client(url, retry=FAST_RETRY, timeout=5) as client:
        assert not client.healthy()
        with pytest.raises(BackendUnavailable):
            client.encode(VIDEO)


@pytest.mark.parametrize("scheme", ["grpc", "http"])
async def test_a_health_check_of_a_silent_server_is_bounded_not_the_call_timeout(
        scheme: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import socket

    from ivvae.client import _grpc, _http

    for module in (_grpc, _http):
        monkeypatch.setattr(module, "HEALTH_TIMEOUT_S", 0.5)
    # A listening socket nobody accepts from: the kernel completes the handshake and then
    # nothing answers, as with a stopped process.
    with socket.create_server(("127.0.0.1", 0), backlog=8) as silent:
        port = silent.getsockname()[1]
        async with AsyncClient(f"{scheme}://127.0.0.1:{port}", timeout=600) as client:
            assert not await asyncio.wait_for(client.healthy(), 60)
            assert not await asyncio.wait_for(client.answers(), 60)


async def test_an_answer_that_trickles_in_ends_at_the_call_timeout_over_http() -> None:
    # httpx bounds each read: an answer sent a byte a gap held the call past its timeout
    # for as long as the server kept trickling.
    import asyncio
    import time

    from ivvae.errors import DeadlineExceeded

    stop = asyncio.Event()

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        with contextlib.suppress(OSError):
            while not stop.is_set():
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.2)
        writer.close()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with AsyncClient(f"http://127.0.0.1:{port}", timeout=1.0) as client:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded, match="within 1 s"):
                await asyncio.wait_for(client.models(), 60)
            assert time.monotonic() - started < 30  # not 200 s: 1000 bytes at 5 a second
    finally:
        stop.set()
        server.close()


def test_a_server_deadline_is_a_plain_deadline_exceeded() -> None:
    # NotTakenInTime shares DeadlineExceeded's code and, found later, took its place: every
    # server deadline reached the caller as "the client did not take the answer in time".
    from ivvae.client._common import error_from_code
    from ivvae.errors import DeadlineExceeded, IVVAEError

    assert type(error_from_code("deadline_exceeded", "x")) is DeadlineExceeded
    classes = [IVVAEError]
    for cls in classes:
        classes += cls.__subclasses__()
        if cls.code not in {c.code for c in cls.__mro__[1:] if issubclass(c, IVVAEError)}:
            assert type(error_from_code(cls.code, "x")) is cls


def test_bad_urls() -> None:
    for url in ("ftp://x", "grpc://", "grpc://host:1/path"):
        with pytest.raises(ValueError):
            Client(url)
    # A port out of range went on to another port (99999 is 34463 to grpc) or failed at the
    # first call in an ExceptionGroup; one that is no number was retried as unavailable.
    for url in ("grpc://127.0.0.1:99999", "127.0.0.1:abc", "http://127.0.0.1:99999",
                "https://h:abc"):
        with pytest.raises(ValueError, match="port"):
            Client(url)


def test_client_does_not_import_torch(server: ServerThread) -> None:
    script = f"""
import sys
from ivvae.client import Client
with Client({server.grpc_url!r}, api_key={KEY!r}) as c:
    latent = c.encode({VIDEO!r})
with Client({server.http_url!r}, api_key={KEY!r}) as h:
    h.models()
assert "torch" not in sys.modules, "the client imported torch"
latent.torch()
assert "torch" in sys.modules
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


async def test_arguments_a_header_or_a_field_cannot_carry_are_refused_here() -> None:
    # A key with a line break came back as BackendUnavailable quoting the key (HTTP) or as
    # a bare INTERNAL (gRPC); crf=-1 as protobuf's "Value out of range" on gRPC only.
    for key in ("secret\nkey", "sécret", " padded", "tab\tkey"):
        with pytest.raises(ValueError, match="visible ASCII") as caught:
            AsyncClient("http://127.0.0.1:9", api_key=key)
        assert key not in str(caught.value)
    AsyncClient("http://127.0.0.1:9", api_key="an inner space")  # the server accepts these
    from pydantic import ValidationError

    from ivvae.config import Settings

    with pytest.raises(ValidationError, match="characters a header cannot carry"):
        Settings(api_keys="good,sécret")
    assert Settings(api_keys="good, an inner space").api_keys
    for url in ("http://127.0.0.1:9", "grpc://127.0.0.1:9"):
        client = AsyncClient(url)
        for crf in (-1, 52, 1.5, True):
            with pytest.raises(ValueError, match=r"crf must be an integer in \[0, 51\]"):
                await client.decode(b"not read", crf=crf)  # type: ignore[arg-type]
        await client.close()


def test_values_a_request_cannot_carry_are_the_same_error_on_both_transports(
        url: str) -> None:
    # Over gRPC a protobuf ValueError ("Value out of range: -1") came out, naming nothing.
    from ivvae.errors import InvalidInput

    latent = np.zeros((1, 4, 3, 6, 8), np.float32)
    with Client(url, api_key=KEY) as client:
        for bad in ({"height": -1}, {"width": "abc"}):
            name = next(iter(bad))
            with pytest.raises(InvalidInput, match=f"'{name}'"):
                client.decode(latent, **bad)
        for seed in (-1, 2**64):
            with pytest.raises(InvalidInput, match="'seed'"):
                client.encode(VIDEO, sample=True, seed=seed)


def test_a_ca_cert_needs_a_tls_url_and_a_file(tmp_path: Path) -> None:
    # Over grpc:// it was ignored (plain text while the user asked to verify a server), and
    # a missing file failed at the first call without its name.
    cert = tmp_path / "ca.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    for url in ("grpc://127.0.0.1:1", "http://127.0.0.1:1"):
        with pytest.raises(ValueError, match="plain text"):
            Client(url, ca_cert=cert)
    with pytest.raises(FileNotFoundError, match=r"nope\.pem"):
        Client("grpcs://127.0.0.1:1", ca_cert=tmp_path / "nope.pem")


async def test_a_service_that_is_up_but_not_ready_answers(server: ServerThread, url: str,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    # encode-dataset asks answers() after a deadline to tell a wedged service from a busy
    # one: a service whose backend is down still answers (/healthz, or NOT_SERVING), and a
    # run must not be given up for it (its clips fail and are retried instead).
    import asyncio

    async def down() -> tuple[bool, str]:
        return False, "down (test)"

    monkeypatch.setattr(server.service.backend, "ready", down)
    async with AsyncClient(url, api_key=KEY, timeout=30) as client:
        for _ in range(300):  # the gRPC health status follows readiness by polling
            if not await client.healthy():
                break
            await asyncio.sleep(0.1)
        assert not await client.healthy()
        assert await client.answers()
