"""Answers that end before they are whole, after their status went out. One whose backend
fails (Triton gone mid-decode) can only be cut off: the client sees a body that never ends
properly, and the log says why in one warning line, with no ERROR and no traceback (the
failure is the backend's, not a bug in the server). Either way the request is counted as
what ended it, not as the "ok" its status line said."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from ivvae.api.http import create_app
from ivvae.api.http.protocol import ConnectionLimits
from ivvae.backends.base import SequenceDecode
from ivvae.errors import BackendUnavailable
from tests import media
from tests.service_fixtures import tiny_settings, tiny_weights, uvicorn_thread  # noqa: F401


@pytest.fixture
def server(tiny_weights: Path) -> Iterator[str]:  # noqa: F811
    app = create_app(tiny_settings(tiny_weights, groups_per_step=1))
    with uvicorn_thread(app, ConnectionLimits(), lifespan="on") as port:
        yield f"http://127.0.0.1:{port}"


def _fail_decode_step(monkeypatch: pytest.MonkeyPatch, fail_at: int) -> list[int]:
    """Decoder steps after the first fail at the ``fail_at``-th, as a backend gone away;
    the list holds how many were called."""
    called = [0]
    real_next = SequenceDecode.next

    async def failing_next(self: SequenceDecode, z: np.ndarray) -> np.ndarray:
        called[0] += 1
        if called[0] == fail_at:
            raise BackendUnavailable("the backend went away (test)")
        return await real_next(self, z)

    monkeypatch.setattr(SequenceDecode, "next", failing_next)
    return called


# (output, steps after the first, the one that fails): after the answer began (x264 holds
# some 20 frames before its first packet)
@pytest.mark.parametrize(("output", "steps", "fail_at"), [("mp4", 39, 30), ("frames", 11, 6)])
def test_a_backend_failure_mid_stream_cuts_the_answer_with_one_warning(
        server: str, output: str, steps: int, fail_at: int, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    video = media.make_video(None, frames=1 + 4 * steps, width=32, height=32)
    with httpx.Client(base_url=server, timeout=60) as http:
        latent = http.post("/encode", content=video, headers={"content-type": "video/mp4"})
        assert latent.status_code == 200, latent.text
        whole = http.post("/decode", content=latent.content, params={"format": output})
        assert whole.status_code == 200

        called = _fail_decode_step(monkeypatch, fail_at)
        caplog.clear()
        got = b""
        with caplog.at_level(logging.INFO), pytest.raises(httpx.RemoteProtocolError), \
                http.stream("POST", "/decode", content=latent.content,
                            params={"format": output}) as cut:
            assert cut.status_code == 200
            for chunk in cut.iter_raw():
                got += chunk
        assert called == [fail_at] and len(got) < len(whole.content)
        # The connection was closed, not left half-used: the next request is answered.
        assert http.get("/healthz").status_code == 200
        # Counted as what ended it, not as the "ok" its status line said.
        metrics = http.get("/metrics").text
        assert ('ivvae_requests_total{op="decode",outcome="backend_unavailable",'
                'transport="http"} 1.0') in metrics, metrics
        assert 'ivvae_errors_total{code="backend_unavailable"} 1.0' in metrics
        assert ('ivvae_requests_total{op="decode",outcome="ok",transport="http"} 1.0'
                in metrics)  # the whole decode before
        assert "ivvae_in_flight_requests 0.0" in metrics

    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.levelname for r in records] == ["WARNING"], caplog.text
    assert "cut off" in records[0].getMessage()
    assert "backend_unavailable" in records[0].getMessage()
    assert "the backend went away (test)" in records[0].getMessage()
    assert not any(r.exc_info for r in caplog.records), caplog.text


def _requests(metrics: str, op: str) -> dict[str, float]:
    return {line.split('outcome="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("ivvae_requests_total{") and f'op="{op}"' in line}


@pytest.mark.parametrize("op", ["frames", "decode"])
def test_a_client_gone_mid_answer_is_counted_cancelled(server: str, op: str) -> None:
    # uvicorn drops what is sent to a client that went away, at once: the rest of a whole
    # answer "went" nowhere in no time and the request was counted ok.
    import socket
    from urllib.parse import urlparse

    with httpx.Client(base_url=server, timeout=60) as http:
        video = media.make_video(None, frames=1 + 4 * 39, width=128, height=128)
        path, body = "/frames", video  # 7.7 MB of uint8 frames
        if op == "decode":  # a tensor answer: 15 MB of float32 frames
            path = "/decode?shape=1,4,20,16,16&dtype=float32&output_type=pt"
            body = np.random.default_rng(0).standard_normal((1, 4, 20, 16, 16),
                                                           np.float32).tobytes()
        url = urlparse(server)
        with socket.create_connection((url.hostname, url.port), timeout=60) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         f"application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n"
                         .encode() + body)
            head = sock.recv(100)
            assert head.startswith(b"HTTP/1.1 200"), head
        deadline = time.monotonic() + 60
        while not _requests(http.get("/metrics").text, op).get("cancelled"):
            assert time.monotonic() < deadline, http.get("/metrics").text
            time.sleep(0.2)
        assert _requests(http.get("/metrics").text, op) == {"cancelled": 1.0}


def test_an_answer_collected_before_it_was_whole_counts_once_and_quietly() -> None:
    # An answer dropped before its __init__ ended (its own arguments refused) had no
    # ``counted`` for __del__ to read: an "Exception ignored" AttributeError at every such
    # collection. One collected unsent counts its request as the client gone, once.
    import gc
    import sys

    from starlette.requests import ClientDisconnect

    from ivvae.api.http.answers import HeldResponse, StreamedInTime

    problems: list[object] = []
    counts: list[BaseException] = []
    before = sys.unraisablehook
    sys.unraisablehook = problems.append
    try:
        for cls in (HeldResponse, StreamedInTime):
            half = cls.__new__(cls)
            del half
        unsent = HeldResponse(b"x", release=lambda: None, seconds=1.0,
                              counted=counts.append)
        del unsent
        gc.collect()
    finally:
        sys.unraisablehook = before
    assert problems == []
    assert len(counts) == 1 and isinstance(counts[0], ClientDisconnect)


def test_an_answer_cut_while_the_client_reads_nothing_resets_its_connection(
        server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A cut closed the connection gracefully. With all that was sent already in the
    # kernel's buffer (13 small frames, 39 kB: more than the client's, less than the
    # server's), the socket closed at once and its reset, meant for a client that reads
    # nothing, went with it: the kernel held what was queued for that client instead.
    import errno
    import socket
    from urllib.parse import urlparse

    latent = np.random.default_rng(0).standard_normal((1, 4, 12, 4, 4), np.float32)
    called = _fail_decode_step(monkeypatch, 4)
    url = urlparse(server)
    with socket.create_connection((url.hostname, url.port), timeout=60) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"POST /decode?shape=1,4,12,4,4&dtype=float32&format=frames HTTP/1.1\r\n"
                     b"Host: x\r\nContent-Length: %d\r\n\r\n" % latent.nbytes
                     + latent.tobytes())
        assert sock.recv(100).startswith(b"HTTP/1.1 200")  # then it reads no more
        deadline = time.monotonic() + 30
        while sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != errno.ECONNRESET:
            assert time.monotonic() < deadline, "the connection was kept for the client"
            time.sleep(0.2)
    assert called == [4]


def _cut_app(after_client_left: bool) -> Any:
    """An answer that begins, then fails on the server's side: at once, or once its client
    has gone."""
    import asyncio

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x" * 100, "more_body": True})
        if after_client_left:
            while (await receive())["type"] != "http.disconnect":
                pass
            await asyncio.sleep(0.2)  # its connection_lost has run
        raise BackendUnavailable("the backend went away (test)")

    return app


@pytest.mark.parametrize("tls", [False, True])
def test_a_cut_answer_ends_at_once_for_a_client_that_reads_it(
        tls: bool, tmp_path: Path) -> None:
    # Over TLS there is no half-close: the connection stayed open, silent, for the whole
    # linger after the cut.
    import socket
    import ssl

    from tests.tls import self_signed

    config: dict[str, Any] = {}
    if tls:
        cert, key = self_signed(tmp_path)
        config = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    with uvicorn_thread(_cut_app(False), ConnectionLimits(linger_s=60), **config) as port:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        if tls:
            context = ssl.create_default_context(cafile=str(cert))
            sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
        with sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            with contextlib.suppress(ssl.SSLError, ConnectionResetError):
                while chunk := sock.recv(65536):  # a timeout (30 s) fails the test
                    got += chunk
    assert got.startswith(b"HTTP/1.1 200") and b"x" * 100 in got


def test_a_cut_after_the_client_left_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    # The linger's end then asked a closed socket (fd -1) for its unsent bytes: an
    # "Exception in callback" traceback at ERROR for every such cut.
    import socket

    with caplog.at_level(logging.WARNING), uvicorn_thread(
            _cut_app(True), ConnectionLimits(linger_s=0.3)) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 200")
        time.sleep(2)  # past the cut (0.2 s after the client left) and its linger
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
