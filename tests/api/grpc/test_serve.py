"""``ivvae serve`` runs HTTP and gRPC side by side and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ivvae.client import Client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _grpc_serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _http_ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_serve_both_transports_and_sigterm(tiny_weights: Path, tmp_path: Path) -> None:
    http_port, grpc_port = _free_port(), _free_port()
    env = {**os.environ, "IVVAE_WEIGHTS": str(tiny_weights), "IVVAE_HOST": "127.0.0.1",
           "IVVAE_PORT": str(http_port), "IVVAE_GRPC_PORT": str(grpc_port),
           "IVVAE_LOG_LEVEL": "warning", "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "ivvae.cli", "serve"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while not (_http_ready(http_port) and _grpc_serving(grpc_port)):
            assert proc.poll() is None, Path(log.name).read_text()
            assert time.monotonic() < deadline, "ivvae serve did not get ready"
            time.sleep(0.2)
        with Client(f"grpc://127.0.0.1:{grpc_port}") as over_grpc, \
                Client(f"http://127.0.0.1:{http_port}") as over_http:
            assert over_grpc.models().names() == over_http.models().names()

        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
        assert code == 0, Path(log.name).read_text()
        assert time.monotonic() - start < 8
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
