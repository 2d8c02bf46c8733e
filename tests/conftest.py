"""Shared fixtures: tiny models, paths of bundled test data."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
GOLDEN_FILES = sorted((DATA / "golden").glob("*.safetensors"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA
