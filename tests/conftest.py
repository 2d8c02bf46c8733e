"""Shared fixtures: tiny models, paths of bundled test data."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_server import redis_server  # noqa: F401  (the `redis_server` fixture)
from tests.service_fixtures import tiny_service, tiny_weights  # noqa: F401  (fixtures)
from tests.triton_server import ivvae_triton, tiny_exports  # noqa: F401  (session fixtures)

DATA = Path(__file__).parent / "data"

# A shell without job control starts a background job (`./dev test &`) with SIGINT ignored,
# and children inherit that: the Ctrl-C tests' CLIs then never saw their SIGINT. A handler
# here is reset to the default in every child at exec, as an ignored signal is not.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
GOLDEN_FILES = sorted((DATA / "golden").glob("*.safetensors"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session", autouse=True)
def _state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep what the service writes on its own (the generated cache secret) out of the
    user's home, for this process and every `ivvae serve` it starts."""
    previous = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))
    yield
    if previous is None:
        del os.environ["XDG_STATE_HOME"]
    else:
        os.environ["XDG_STATE_HOME"] = previous
