"""Helpers shared by the benchmark scripts (run as ``python bench/<script>.py``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    """A free TCP port on loopback (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status_mb(pid: int, field: str) -> float:
    """``VmRSS`` or ``VmHWM`` (peak RSS) of process ``pid``, in MB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def reset_peak_rss(pid: int) -> None:
    """Restart ``VmHWM`` of process ``pid`` from its current RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def make_weights(path: Path, z: int, dim: int, seed: int = 0) -> Path:
    """Random-weight IV-VAE of (z, dim), seeded, written as safetensors."""
    import torch

    from ivvae.model import IVVAE, IVVAEConfig, save_safetensors

    torch.manual_seed(seed)
    model = IVVAE(IVVAEConfig(z_dim=z, dim=dim))
    model.name = f"bench_z{z}_dim{dim}"
    save_safetensors(model, path)
    return path


class ServeProcess:
    """``ivvae serve`` in a subprocess, HTTP and gRPC on free loopback ports.

    ``weights``: a file, or ``""`` for the bundled model. ``env``: more ``IVVAE_*`` (or
    thread) variables. Entering waits until ``/readyz`` answers 200 (gRPC starts before
    HTTP, so it is up too); a server that exits or is not ready in ``ready_s`` raises.
    """

    def __init__(self, weights: str | Path, *, ready_s: float = 120, **env: str) -> None:
        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_url = f"grpc://127.0.0.1:{self.grpc_port}"
        self.ready_s = ready_s
        self.env = dict(os.environ, IVVAE_WEIGHTS=str(weights), IVVAE_HOST="127.0.0.1",
                        IVVAE_PORT=str(self.port), IVVAE_GRPC_PORT=str(self.grpc_port),
                        IVVAE_LOG_LEVEL="warning", **env)
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServeProcess:
        import httpx

        self.proc = subprocess.Popen([sys.executable, "-m", "ivvae.cli", "serve"], env=self.env)
        deadline = time.monotonic() + self.ready_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("ivvae serve did not become ready")

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(30)
