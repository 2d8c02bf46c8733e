"""Fixtures for service-level tests: tiny weights on disk, an app + async client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from ivvae.api.http import create_app
from ivvae.config import Settings

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
