"""Helpers shared by the benchmark scripts (run as ``python bench/<script>.py``)."""

from __future__ import annotations

import socket
from pathlib import Path


def free_port() -> int:
    """A free TCP port on loopback (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_weights(path: Path, z: int, dim: int, seed: int = 0) -> Path:
    """Random-weight IV-VAE of (z, dim), seeded, written as safetensors."""
    import torch

    from ivvae.model import IVVAE, IVVAEConfig, save_safetensors

    torch.manual_seed(seed)
    model = IVVAE(IVVAEConfig(z_dim=z, dim=dim))
    model.name = f"bench_z{z}_dim{dim}"
    save_safetensors(model, path)
    return path
