"""A client that stops sending mid-upload (it failed to read its own file, or was killed)
is not a server error: no ERROR log, no traceback, outcome="cancelled" as for a cancelled
gRPC call."""

from __future__ import annotations

import errno
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from tests.service_fixtures import serve_process, tiny_weights  # noqa: F401


def _requests_metric(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("ivvae_requests_total{") and 'op="encode"' in line:
            outcome = line.split('outcome="')[1].split('"')[0]
            out[outcome] = float(line.rsplit(" ", 1)[1])
    return out


def test_a_client_that_disconnects_mid_upload_is_not_a_server_error(
        tmp_path: Path, tiny_weights: Path) -> None:  # noqa: F811
    log = tmp_path / "serve.log"
    with serve_process(tiny_weights, log=log, IVVAE_LOG_LEVEL="info") as url:
        with _connect(url) as sock:
            sock.sendall(b"POST /encode HTTP/1.1\r\nHost: ivvae\r\nContent-Type: video/mp4\r\n"
                         b"Content-Length: 1000000\r\n\r\n" + b"\0" * 4096)
            # Go away only once the server is reading the body (else it never sees a request).
            deadline = time.monotonic() + 30
            while "ivvae_in_flight_requests 1.0" not in httpx.get(url + "/metrics").text:
                assert time.monotonic() < deadline, "the request never started"
                time.sleep(0.1)
        deadline = time.monotonic() + 30
        while not _requests_metric(url) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _requests_metric(url) == {"cancelled": 1.0}
    text = log.read_text()
    assert "Traceback" not in text and " ERROR " not in text, text
    assert "the client disconnected" in text


def _gauge(url: str, name: str, label: str) -> float:
    """The sum of gauge ``name`` over its series with ``label`` (they must exist)."""
    values = [float(line.rsplit(" ", 1)[1])
              for line in httpx.get(url + "/metrics").text.splitlines()
              if line.startswith(name + "{") and label in line]
    assert values, f"no {name} series with {label}"
    return sum(values)


def _connect(url: str) -> socket.socket:
    """A raw connection to the server at ``url``."""
    port = urlparse(url).port
    assert port is not None
    return socket.create_connection(("127.0.0.1", port))


def _decode_request(shape: tuple[int, ...], output: str) -> tuple[Any, bytes]:
    """A random latent of ``shape`` and the raw HTTP request that decodes it (``output``:
    the query's output parameter)."""
    import numpy as np

    latent = np.random.default_rng(0).standard_normal(shape, np.float32)
    head = (f"POST /decode?shape={','.join(map(str, shape))}&dtype=float32&{output} "
            f"HTTP/1.1\r\nHost: ivvae\r\nContent-Length: {latent.nbytes}\r\n\r\n")
    return latent, head.encode() + latent.tobytes()


def test_a_client_that_goes_away_mid_decode_frees_its_session(
        tmp_path: Path, tiny_weights: Path) -> None:  # noqa: F811
    # Starlette cancels the response task when the client goes; every later await in it is
    # cancelled too, so a cleanup that awaits (a session's close) must not depend on it.
    # 65 frames of 256x256 (12.8 MB): more than loopback buffers take, so the client's
    # leaving cuts the stream.
    latent, request = _decode_request((1, 4, 17, 32, 32), "format=frames")
    with serve_process(tiny_weights, log=tmp_path / "serve.log") as url:
        for _ in range(3):
            with _connect(url) as sock:
                sock.sendall(request)
                assert sock.recv(100).startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + 30
        sessions = ("ivvae_active_sessions", 'kind="decode"')
        while _gauge(url, *sessions) != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _gauge(url, *sessions) == 0
        # Their feature caches went with them (else they stay until their time-to-live).
        assert _gauge(url, "ivvae_open_sequences", 'direction="decoder"') == 0
        assert _gauge(url, "ivvae_evicted_sequences", 'direction="decoder"') == 0
        whole = httpx.post(url + "/decode?shape=1,4,17,32,32&dtype=float32&format=frames",
                           content=latent.tobytes(), timeout=60)
        assert whole.status_code == 200


def test_a_client_that_stops_reading_is_cut_at_the_request_timeout(
        tmp_path: Path, tiny_weights: Path) -> None:  # noqa: F811
    # Between decoder steps nothing waited on the clock: a client that stopped reading a
    # streamed decode held its session (and its memory budget share) for ever.
    _, request = _decode_request((1, 4, 33, 32, 32), "format=frames")
    with serve_process(tiny_weights, log=tmp_path / "serve.log",
                       IVVAE_REQUEST_TIMEOUT_S="10") as url, _connect(url) as sock:
        # 10 s: the first frames must come before it even on a loaded machine (with 4 s a
        # busy CI machine answered 504 first).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(request)
        head = sock.recv(100)
        assert head.startswith(b"HTTP/1.1 200"), head  # then it reads no more
        deadline = time.monotonic() + 60
        sessions = ("ivvae_active_sessions", 'kind="decode"')
        while _gauge(url, *sessions) != 0:
            assert time.monotonic() < deadline, "the stalled decode was never cut"
            time.sleep(0.5)
        assert _gauge(url, "ivvae_open_sequences", 'direction="decoder"') == 0
        # and the connection is reset, not kept for the client with what was queued for it
        while sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != errno.ECONNRESET:
            assert time.monotonic() < deadline, "the connection was kept for the client"
            time.sleep(0.5)


async def test_a_streamed_answer_not_taken_in_time_ends_and_closes_its_source() -> None:
    # The mechanism alone, without a machine's socket buffers and speed in the way: a send
    # that never completes (a client that reads nothing) ends the answer at its deadline.
    import asyncio

    import pytest

    from ivvae.api.http.answers import StreamedInTime
    from ivvae.errors import DeadlineExceeded

    closed = asyncio.Event()

    async def body():  # type: ignore[no-untyped-def]
        try:
            for _ in range(100):
                yield b"x" * 1024
        finally:
            closed.set()

    sent: list[str] = []

    async def send(message: dict) -> None:  # type: ignore[type-arg]
        sent.append(message["type"])
        if message["type"] == "http.response.body":
            await asyncio.Event().wait()  # the client reads nothing

    async def receive() -> dict:  # type: ignore[type-arg]
        await asyncio.Event().wait()
        return {}

    response = StreamedInTime(body(), seconds=0.3, media_type="video/mp4")
    with pytest.raises(DeadlineExceeded, match=r"did not read the answer within 0\.3 s"):
        await asyncio.wait_for(response({"type": "http", "asgi": {"spec_version": "2.4"}},
                                        receive, send), 10)
    await asyncio.wait_for(closed.wait(), 5)
    assert sent == ["http.response.start", "http.response.body"]


def test_a_client_that_goes_away_before_a_tensor_answer_cancels_its_decode(
        tmp_path: Path, tiny_weights: Path) -> None:  # noqa: F811
    # output_type=pt (and a batch's zip) is answered whole: the decode ran to its end for a
    # client long gone, holding its share of the budget (minutes, on a big batch).
    _, request = _decode_request((1, 4, 25, 32, 32), "output_type=pt")
    with serve_process(tiny_weights, log=tmp_path / "serve.log",
                       IVVAE_TORCH_THREADS="1") as url:
        with _connect(url) as sock:
            sock.sendall(request)
            # Go away once the decode runs (not while the upload is still read).
            deadline = time.monotonic() + 30
            while _gauge(url, "ivvae_active_sessions", 'kind="decode"') < 1:
                assert time.monotonic() < deadline, "the decode never started"
                time.sleep(0.1)
        deadline = time.monotonic() + 120
        while "ivvae_in_flight_requests 0.0" not in httpx.get(url + "/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        metrics = httpx.get(url + "/metrics").text
    decoded = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("ivvae_frames_total{") and 'op="decode"' in line)
    assert decoded < 97, "the whole video was decoded for a client that had gone"
    outcomes = [line for line in metrics.splitlines()
                if line.startswith("ivvae_requests_total{") and 'op="decode"' in line]
    assert outcomes == ['ivvae_requests_total{op="decode",outcome="cancelled",'
                        'transport="http"} 1.0'], outcomes


def test_a_whole_answer_not_taken_in_time_resets_the_connection(
        tmp_path: Path, tiny_weights: Path) -> None:  # noqa: F811
    # A whole answer (/frames, /decode as one file) went to the socket in one write that
    # returned at once: its budget share was given back while all of it (up to 512 MB)
    # sat in the connection's buffer, and the connection's graceful close waited for a
    # client that read nothing, for as long as it stayed connected.
    from tests import media

    clip = media.make_video(None, frames=48, width=320, height=240)  # 11 MB of frames
    head = (f"POST /frames HTTP/1.1\r\nHost: ivvae\r\nContent-Type: video/mp4\r\n"
            f"Content-Length: {len(clip)}\r\n\r\n").encode()
    log = tmp_path / "serve.log"
    with serve_process(tiny_weights, log=log, IVVAE_REQUEST_TIMEOUT_S="4",
                       IVVAE_LOG_LEVEL="info") as url, _connect(url) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(head + clip)
        assert sock.recv(100).startswith(b"HTTP/1.1 200")  # then it reads no more
        deadline = time.monotonic() + 60
        while sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != errno.ECONNRESET:
            assert time.monotonic() < deadline, "the connection was kept for the client"
            time.sleep(0.5)
        assert httpx.post(url + "/frames", content=clip, timeout=60,
                          headers={"content-type": "video/mp4"}).status_code == 200
    text = log.read_text()
    assert "Traceback" not in text and " ERROR " not in text, text
