"""Fixtures for service-level tests: tiny weights on disk, an app + async client."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import uvicorn

from ivvae.api.http import create_app
from ivvae.api.http.protocol import ConnectionLimits, bounded_protocol
from ivvae.config import Settings
from ivvae.service import Service
from tests.redis_server import free_port

TINY_NAME = "tiny_z4_dim4"


def write_tiny_weights(path: Path, seed: int = 0, name: str = TINY_NAME) -> Path:
    import torch

    from ivvae.model import IVVAE, IVVAEConfig, save_safetensors

    torch.manual_seed(seed)
    model = IVVAE(IVVAEConfig(z_dim=4, dim=4, scale_factor=0.8, shift_factor=0.05))
    model.name = name
    save_safetensors(model, path)
    return path


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny.safetensors")


def model_video(weights: Path, latent: Any, **crop: int) -> Any:
    """The in-process model's own decode of a scaled latent ``(B, z, t, h, w)``:
    ``(B, 3, T, H, W)`` float32, the whole video at once (no service, no steps): what a
    served float decode must equal."""
    import torch

    from ivvae.weights import load_weights

    model, _ = load_weights(str(weights))
    with torch.no_grad():
        return model.decode(torch.from_numpy(latent), **crop).numpy()


def tiny_settings(weights: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = dict(weights=str(weights), batch_max_delay_ms=20.0,
                                enable_grpc=False)
    base.update(kw)
    return Settings(**base)


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan, and an in-process client."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ivvae",
                                     timeout=120) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


@contextmanager
def uvicorn_thread(app: Any, limits: ConnectionLimits, *, lifespan: str = "off",
                   slack_s: float = 60.0, **config: Any) -> Iterator[int]:
    """``app`` in a real uvicorn with ivvae's connection protocol, on asyncio's loop (as
    ``ivvae serve`` runs it), in a thread, until the block ends; yields its port.
    ``slack_s``: how long it may take to start, and to stop; ``config``: more
    ``uvicorn.Config`` arguments (``ssl_certfile``, ...)."""
    port = free_port()
    settings = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                              lifespan=lifespan, http=bounded_protocol(limits),
                              loop="asyncio", **config)
    server = uvicorn.Server(settings)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + slack_s
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(slack_s)


@dataclass(frozen=True)
class Served:
    url: str  # HTTP base URL
    grpc_url: str
    pid: int  # SIGSTOP it for a service that keeps its sockets but answers nothing


@contextmanager
def serve_child(weights: str | Path, log: Path | None = None, **env: str) -> Iterator[Served]:
    """``ivvae serve`` in a child process (HTTP and gRPC on free loopback ports) until the
    block ends, once ``/readyz`` answers 200. ``log``: its stdout and stderr go to this file
    (else they are inherited)."""
    port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    full = {**os.environ, "IVVAE_LOG_LEVEL": "warning", **env, "IVVAE_WEIGHTS": str(weights),
            "IVVAE_HOST": "127.0.0.1", "IVVAE_PORT": str(port), "IVVAE_GRPC_PORT": str(grpc_port)}
    out = log.open("wb") if log else None
    proc = subprocess.Popen([sys.executable, "-m", "ivvae.cli", "serve"], env=full,
                            stdout=out, stderr=subprocess.STDOUT if out else None)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ivvae serve exited with code {proc.returncode}")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("ivvae serve was not ready within 120 s")
            time.sleep(0.2)
        yield Served(url, f"grpc://127.0.0.1:{grpc_port}", proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)  # a stopped process would ignore SIGTERM
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if out:
            out.close()


@contextmanager
def serve_process(weights: str | Path, log: Path | None = None, **env: str) -> Iterator[str]:
    """``serve_child``'s HTTP base URL."""
    with serve_child(weights, log, **env) as served:
        yield served.url


@pytest_asyncio.fixture
async def tiny_service(tiny_weights: Path) -> AsyncIterator[Service]:
    """A started in-process ``Service`` on the tiny weights (local backend, memory cache)."""
    svc = Service(tiny_settings(tiny_weights))
    await svc.start()
    try:
        yield svc
    finally:
        await svc.close()
