"""A streamed answer whose backend fails after its status went out (Triton gone mid-decode)
can only be cut off: the client sees a body that never ends properly, and the log says why
in one warning line, with no ERROR and no traceback (the failure is the backend's, already
reported as such by /readyz and the metrics, not a bug in the server)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn

from ivvae.api.http import create_app
from ivvae.api.http.protocol import ConnectionLimits, bounded_protocol
from ivvae.backends.base import SequenceDecode
from ivvae.errors import BackendUnavailable
from tests import media
from tests.redis_server import free_port
from tests.service_fixtures import tiny_settings, tiny_weights  # noqa: F401

FAIL_AT_STEP = 30  # of 39 steps after the first: after the answer began (x264 holds
# some 20 frames before its first packet)


@pytest.fixture
def server(tiny_weights: Path) -> Iterator[str]:  # noqa: F811
    port = free_port()
    app = create_app(tiny_settings(tiny_weights, groups_per_step=1))
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            lifespan="on", http=bounded_protocol(ConnectionLimits()),
                            loop="asyncio")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(30)


@pytest.mark.parametrize("output", ["mp4", "frames"])
def test_a_backend_failure_mid_stream_cuts_the_answer_with_one_warning(
        server: str, output: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    video = media.make_video(None, frames=1 + 4 * 39, width=32, height=32)
    with httpx.Client(base_url=server, timeout=60) as http:
        latent = http.post("/encode", content=video, headers={"content-type": "video/mp4"})
        assert latent.status_code == 200, latent.text
        whole = http.post("/decode", content=latent.content, params={"format": output})
        assert whole.status_code == 200

        steps = 0
        real_next = SequenceDecode.next

        async def failing_next(self: SequenceDecode, z: np.ndarray) -> np.ndarray:
            nonlocal steps
            steps += 1
            if steps == FAIL_AT_STEP:
                raise BackendUnavailable("the backend went away (test)")
            return await real_next(self, z)

        monkeypatch.setattr(SequenceDecode, "next", failing_next)
        caplog.clear()
        got = b""
        with caplog.at_level(logging.INFO), pytest.raises(httpx.RemoteProtocolError), \
                http.stream("POST", "/decode", content=latent.content,
                            params={"format": output}) as cut:
            assert cut.status_code == 200
            for chunk in cut.iter_raw():
                got += chunk
        assert steps == FAIL_AT_STEP and len(got) < len(whole.content)
        # The connection was closed, not left half-used: the next request is answered.
        assert http.get("/healthz").status_code == 200
        # Counted as what ended it, not as the "ok" its status line said.
        metrics = http.get("/metrics").text
        assert ('ivvae_requests_total{op="decode",outcome="backend_unavailable",'
                'transport="http"} 1.0') in metrics, metrics
        assert 'ivvae_errors_total{code="backend_unavailable"} 1.0' in metrics
        assert ('ivvae_requests_total{op="decode",outcome="ok",transport="http"} 1.0'
                in metrics)  # the whole decode before
        assert "ivvae_in_flight_requests 0.0" in metrics

    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.levelname for r in records] == ["WARNING"], caplog.text
    assert "cut off" in records[0].getMessage()
    assert "backend_unavailable" in records[0].getMessage()
    assert "the backend went away (test)" in records[0].getMessage()
    assert not any(r.exc_info for r in caplog.records), caplog.text
