"""A client that stops sending mid-upload (it failed to read its own file, or was killed)
is not a server error: no ERROR log, no traceback, outcome="cancelled" as for a cancelled
gRPC call."""

from __future__ import annotations

import socket
import time
from pathlib import Path
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
        port = urlparse(url).port
        assert port is not None
        with socket.create_connection(("127.0.0.1", port)) as sock:
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
