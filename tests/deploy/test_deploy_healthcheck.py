"""docker/healthcheck.py: the images' health probe (no curl in them) against a real server."""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from tests.tls import self_signed


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = {"/healthz": 200, "/v2/health/ready": 503}.get(self.path, 404)
        self.send_response(status)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[int]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield int(httpd.server_address[1])
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_default_url_is_gateway_liveness_on_ivvae_port(
    healthcheck: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IVVAE_PORT", "8123")
    assert healthcheck.default_url() == "http://127.0.0.1:8123/healthz"


def test_healthy_answer_exits_zero(
    healthcheck: ModuleType, server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IVVAE_PORT", str(server))
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # must be bypassed
    assert healthcheck.main(["healthcheck.py"]) == 0


def test_not_ready_exits_nonzero(
    healthcheck: ModuleType, server: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert healthcheck.main(["hc", f"http://127.0.0.1:{server}/v2/health/ready"]) == 1
    assert "HTTP 503" in capsys.readouterr().err


def test_nothing_listening_exits_nonzero(healthcheck: ModuleType) -> None:
    ok, reason = healthcheck.probe(f"http://127.0.0.1:{_closed_port()}/healthz", timeout_s=2)
    assert not ok and "Connection refused" in reason


def test_tls_gateway_is_probed_over_https(
    healthcheck: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = self_signed(tmp_path)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        port = int(httpd.server_address[1])
        monkeypatch.setenv("IVVAE_PORT", str(port))
        monkeypatch.setenv("IVVAE_TLS_CERT", str(cert))
        assert healthcheck.default_url() == f"https://127.0.0.1:{port}/healthz"
        assert healthcheck.main(["healthcheck.py"]) == 0
        # plain HTTP against the TLS port is not healthy
        ok, _ = healthcheck.probe(f"http://127.0.0.1:{port}/healthz", timeout_s=2)
        assert not ok
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
