"""End to end: the local stack (redis-server + tritonserver + gateway as processes).

Up, encode/decode a real clip over HTTP and gRPC, a Redis cache hit on repeat, Triton
killed -> 503 and /readyz failing, `up` again -> recovered, down -> nothing left running.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from ivvae.client import Client
from ivvae.latents import decode_latent_file
from ivvae.stack import Stack, StackConfig, _processes_mentioning
from ivvae.video import open_video
from tests import media
from tests.redis_server import free_port
from tests.service_fixtures import write_tiny_weights

pytestmark = [pytest.mark.slow, pytest.mark.triton, pytest.mark.redis]


def _wait_for(predicate: object, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.25)
    return False


def test_local_stack_end_to_end(tmp_path: Path) -> None:
    weights = write_tiny_weights(tmp_path / "tiny.safetensors")
    cfg = StackConfig(
        workdir=tmp_path / "stack", weights=str(weights), http_port=free_port(),
        grpc_port=free_port(), redis_port=free_port(), triton_http_port=free_port(),
        triton_grpc_port=free_port(), triton_metrics_port=free_port(),
        extra_env={"IVVAE_LOG_LEVEL": "warning", "IVVAE_REQUEST_TIMEOUT_S": "60",
                   "IVVAE_TRITON_CONNECT_RETRIES": "1"},
    )
    stack = Stack(cfg)
    url = cfg.gateway_url
    clip = media.sample_clip("carphone_pristine")
    try:
        assert set(stack.up()) == {"redis", "triton", "gateway"}
        with httpx.Client(base_url=url, timeout=120) as http:
            ready = http.get("/readyz").json()
            assert ready["backend"]["name"] == "triton" and ready["cache"]["name"] == "redis"
            first = http.post("/encode", content=clip.read_bytes(),
                              headers={"content-type": "video/mp4"})
            assert first.status_code == 200, first.text
            assert first.headers["x-cache"] == "miss"
            again = http.post("/encode", content=clip.read_bytes(),
                              headers={"content-type": "video/mp4"})
            assert again.headers["x-cache"] == "hit" and again.content == first.content
            mp4 = http.post("/decode", content=first.content)
            assert mp4.status_code == 200
            with open_video(mp4.content) as reader:
                assert reader.read_all().shape == (120, 144, 176, 3)

        with Client(f"grpc://127.0.0.1:{cfg.grpc_port}", timeout=120) as grpc_client:
            result = grpc_client.encode(clip)
            assert result.data == first.content  # same bytes as HTTP (a cache hit)
            frames = grpc_client.decode(result, format="frames")
            assert isinstance(frames, np.ndarray) and frames.shape == (120, 144, 176, 3)
        latent, info = decode_latent_file(first.content)
        assert info.num_frames == 120 and latent.shape == (1, 4, 31, 18, 22)

        # Kill tritonserver itself (as a crash would): the gateway answers 503, not ready.
        triton_pids = [p for p in _processes_mentioning(str(stack.dir / "triton"))
                       if "tritonserver" in Path(f"/proc/{p}/cmdline").read_text(
                           errors="replace")]
        assert triton_pids
        for pid in triton_pids:
            os.kill(pid, signal.SIGKILL)
        other = media.make_video(None, frames=9, width=32, height=24)
        with httpx.Client(base_url=url, timeout=120) as http:
            down = http.post("/encode", content=other, headers={"content-type": "video/mp4"})
            assert down.status_code == 503, down.text
            assert down.json()["error"] == "backend_unavailable"
            assert _wait_for(lambda: http.get("/readyz").status_code == 503)
            assert http.get("/healthz").status_code == 200  # alive, just not ready

            assert set(stack.up()) == {"redis", "triton", "gateway"}  # restarts Triton
            assert _wait_for(lambda: http.get("/readyz").status_code == 200, 60)
            back = http.post("/encode", content=other, headers={"content-type": "video/mp4"})
            assert back.status_code == 200 and back.headers["x-cache"] == "miss"
    finally:
        stack.down()
    assert not _processes_mentioning(str(stack.dir))
    assert not stack.running()
    for port in (cfg.http_port, cfg.grpc_port, cfg.redis_port, cfg.triton_grpc_port):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
