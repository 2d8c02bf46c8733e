"""TLS: ``ivvae serve`` with IVVAE_TLS_CERT/KEY serves HTTPS and gRPC over TLS; clients
verify it against a private CA (``ca_cert``) and get the same latents as in-process."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from ivvae.client import Client, RetryPolicy
from ivvae.client._common import RETRYABLE
from ivvae.config import Settings
from ivvae.errors import BackendUnavailable, UntrustedCertificate
from tests import media
from tests.api.grpc.test_serve import _free_port
from tests.service_fixtures import tiny_weights  # noqa: F401
from tests.tls import self_signed


def test_settings_need_both_tls_files(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    with pytest.raises(ValidationError, match="together"):
        Settings(tls_cert=str(cert))
    with pytest.raises(ValidationError, match="no such file"):
        Settings(tls_cert=str(cert), tls_key=str(tmp_path / "missing.key"))
    assert Settings(tls_cert=str(cert), tls_key=str(key)).tls_pair() == (cert.read_bytes(),
                                                                          key.read_bytes())
    assert Settings().tls_pair() is None


def _ready(port: int, cert: Path) -> bool:
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        return httpx.get(f"https://127.0.0.1:{port}/readyz", timeout=1,
                         verify=ctx).status_code == 200
    except httpx.HTTPError:
        return False


def test_serve_over_tls(tiny_weights: Path, tmp_path: Path) -> None:  # noqa: F811
    cert, key = self_signed(tmp_path)
    http_port, grpc_port = _free_port(), _free_port()
    env = {**os.environ, "IVVAE_WEIGHTS": str(tiny_weights), "IVVAE_HOST": "127.0.0.1",
           "IVVAE_PORT": str(http_port), "IVVAE_GRPC_PORT": str(grpc_port),
           "IVVAE_TLS_CERT": str(cert), "IVVAE_TLS_KEY": str(key),
           "IVVAE_LOG_LEVEL": "warning", "OMP_NUM_THREADS": "1",
           "IVVAE_HTTP_HEADER_TIMEOUT_S": "2"}
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "ivvae.cli", "serve"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    clip = media.make_video(tmp_path / "clip.mp4", frames=6, width=40, height=24)
    try:
        deadline = time.monotonic() + 90
        while not _ready(http_port, cert):
            assert proc.poll() is None, Path(log.name).read_text()
            assert time.monotonic() < deadline, "ivvae serve did not get ready"
            time.sleep(0.2)
        with Client(f"grpcs://127.0.0.1:{grpc_port}", ca_cert=cert) as over_grpc, \
                Client(f"https://127.0.0.1:{http_port}", ca_cert=cert) as over_http:
            a = over_grpc.encode(clip)
            b = over_http.encode(clip)
        assert a.latent_shape == b.latent_shape == (1, 4, 3, 3, 5)
        assert (a.numpy() == b.numpy()).all()

        # Plain text against the TLS port, and TLS without trusting the CA, both fail.
        once = RetryPolicy(attempts=1)
        with Client(f"grpc://127.0.0.1:{grpc_port}", retry=once, timeout=5) as plain, \
                pytest.raises(BackendUnavailable):
            plain.models()
        # An untrusted certificate is no outage: one clear error naming ca_cert, not
        # retried (the default policy retries only what a retry can fix).
        for url in (f"grpcs://127.0.0.1:{grpc_port}", f"https://127.0.0.1:{http_port}"):
            with Client(url, timeout=5) as untrusted, \
                    pytest.raises(UntrustedCertificate) as caught:
                untrusted.models()
            assert caught.value.code == "tls_untrusted", (url, caught.value)
            assert not isinstance(caught.value, RETRYABLE) and "ca_cert" in str(caught.value)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"https://127.0.0.1:{http_port}/healthz", timeout=5)

        # A client that never finishes its TLS handshake is closed after the header
        # timeout (2 s here), not asyncio's default 60 s (the 15 s wait is slack for CI).
        with socket.create_connection(("127.0.0.1", http_port), timeout=15) as idle:
            idle.sendall(b"\x16\x03\x01")  # the start of a ClientHello, never the rest
            assert idle.recv(1024) == b""
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
