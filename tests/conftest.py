"""Shared fixtures: tiny models, paths of bundled test data."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.redis_server import redis_server  # noqa: F401  (the `redis_server` fixture)
from tests.service_fixtures import tiny_weights  # noqa: F401  (session fixture)
from tests.triton_server import ivvae_triton, tiny_exports  # noqa: F401  (session fixtures)

DATA = Path(__file__).parent / "data"
GOLDEN_FILES = sorted((DATA / "golden").glob("*.safetensors"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA
