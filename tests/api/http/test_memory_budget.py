"""The memory budget against a real ``ivvae serve`` (the bundled model, real sockets): inputs
inside the default limits that no step plan fits are refused at once with a 413 naming the
budget, those that fit are encoded with steps planned to fit, and the server's peak RSS
(VmHWM) stays inside ``IVVAE_MEMORY_BUDGET_MB``, one request or four at once."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import av
import httpx
import numpy as np
import pytest
from bench._common import ServeProcess, status_mb

from tests import media

BUDGET_MB = 3000

pytestmark = pytest.mark.slow


def _tiny_stream_declaring_1088p() -> bytes:
    """One black 1920x1088 H.264 frame as a raw Annex B stream: a few KB that declare a
    picture size whose decoding, and whose encoding by the model, costs gigabytes."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 1920, 1088, "yuv420p"
        stream.options = {"crf": "51", "preset": "veryslow"}
        frame = av.VideoFrame.from_ndarray(np.zeros((1088, 1920, 3), np.uint8), format="rgb24")
        for packet in (*stream.encode(frame), *stream.encode()):
            container.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    with ServeProcess("", ready_s=600, IVVAE_ENABLE_GRPC="false",
                      IVVAE_MEMORY_BUDGET_MB=str(BUDGET_MB), IVVAE_TORCH_THREADS="2",
                      IVVAE_REQUEST_TIMEOUT_S="600") as srv:
        yield srv


@pytest.fixture(scope="module")
def uploads() -> dict[str, bytes]:
    return {
        "1080p x17": media.make_video(None, frames=17, width=1920, height=1080),
        "1088p stream": _tiny_stream_declaring_1088p(),
    }


def _model_steps(server: ServeProcess) -> float:
    """Model calls so far (the batch histogram's count): to see that a 413 ran none."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return sum(float(v) for v in re.findall(r'^ivvae_batch_size_count\{[^}]*\} (\S+)$', text,
                                           re.M))


def _encode(server: ServeProcess, data: bytes) -> httpx.Response:
    return httpx.post(server.url + "/encode", content=data,
                      headers={"content-type": "video/mp4"}, timeout=900)


@pytest.mark.parametrize("name", ["1080p x17", "1088p stream"])
def test_one_big_request_is_served_or_refused_at_once_within_the_budget(
    server: ServeProcess, uploads: dict[str, bytes], name: str
) -> None:
    before = _model_steps(server)
    r = _encode(server, uploads[name])
    assert r.status_code in (200, 413), r.text[:300]
    if r.status_code == 413:
        detail = r.json()["detail"]
        assert "IVVAE_MEMORY_BUDGET_MB" in detail and f"{BUDGET_MB:,} MB" in detail, detail
        assert "fit" in detail
        assert _model_steps(server) == before  # refused before any model work
    assert server.proc is not None
    assert status_mb(server.proc.pid, "VmHWM") <= BUDGET_MB


def test_four_at_once_none_fails_and_the_peak_stays_in_the_budget(
    server: ServeProcess, uploads: dict[str, bytes]
) -> None:
    bodies = [uploads["1080p x17"], uploads["1088p stream"]] * 2
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda b: _encode(server, b), bodies))
    assert all(r.status_code in (200, 413, 503) for r in replies), [
        (r.status_code, r.text[:200]) for r in replies]
    assert server.proc is not None
    assert status_mb(server.proc.pid, "VmHWM") <= BUDGET_MB


def test_a_video_that_fits_is_encoded_within_the_budget(server: ServeProcess) -> None:
    r = _encode(server, media.make_video(None, frames=17, width=320, height=240))
    assert r.status_code == 200, r.text[:300]
    assert r.headers["x-latent-shape"] == "1,16,5,30,40"
    assert server.proc is not None
    assert status_mb(server.proc.pid, "VmHWM") <= BUDGET_MB
