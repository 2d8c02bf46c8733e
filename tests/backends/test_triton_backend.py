"""The gateway with ``IVVAE_BACKEND=triton`` against a real tritonserver (CPU, from the wheel).

The shared ``ivvae_triton`` server runs the project's ``model_repository/`` over the
TorchScript export of the tiny test weights; the local backend loads the same weights, so
both must give the same latents and frames. Tests that kill a server or a model instance
start their own.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from ivvae.backends.triton import TritonBackend, parse_endpoints
from ivvae.errors import BackendUnavailable, InvalidInput, InvalidLatent
from ivvae.latents import decode_latent_file
from ivvae.metrics import Metrics
from ivvae.safetensors_io import loads
from tests import media
from tests.redis_server import free_port
from tests.service_fixtures import model_video, running_app, tiny_settings
from tests.triton_server import IvvaeTriton

pytestmark = pytest.mark.triton

VIDEO = media.make_video(None, frames=21, width=40, height=24)  # padded to 40x24 -> 5x3
OCTET = {"content-type": "application/octet-stream"}


def settings_for(t: IvvaeTriton, **kw: Any) -> Any:
    kw.setdefault("triton_url", t.server.grpc_url)
    return tiny_settings(t.weights, backend="triton", **kw)


async def encode(client: httpx.AsyncClient, video: bytes = VIDEO) -> httpx.Response:
    return await client.post("/encode", files={"file": ("v.mp4", video, "video/mp4")})


async def decode_frames(client: httpx.AsyncClient, latent_file: bytes,
                        frames_dtype: str = "uint8") -> np.ndarray:
    response = await client.post(f"/decode?format=frames&frames_dtype={frames_dtype}",
                                 content=latent_file, headers=OCTET)
    assert response.status_code == 200, response.text
    return loads(response.content)[0]["frames"].array


def assert_frames_close(a: np.ndarray, b: np.ndarray) -> None:
    """uint8 frames from two backends: equal, but for a few values one level apart.

    Both run the same float32 ops, but with other thread counts (one per Triton instance
    here, the library default in the test process) oneDNN splits the sums differently, and a
    value on a rounding boundary may tip either way. Measured on this 21-frame 40x24 clip:
    identical at equal thread counts; 1 vs 2 threads, 3 of 60,480 values one level apart
    (latents identical).
    """
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 1e-3 * diff.size, (
        diff.max(), np.count_nonzero(diff))


def executions_by_batch_size(t: IvvaeTriton, model: str) -> dict[int, int]:
    stats = httpx.get(f"http://{t.server.http_url}/v2/models/{model}/stats",
                      trust_env=False).json()["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"])
            for b in stats["batch_stats"]}


def triton_metric(t: IvvaeTriton, name: str, model: str) -> float:
    text = httpx.get(f"http://{t.server.metrics_url}/metrics", trust_env=False).text
    values = re.findall(rf'^{name}{{[^}}]*model="{model}"[^}}]*}} (\S+)$', text, re.M)
    return sum(float(v) for v in values)


async def test_encode_and_decode_match_the_local_backend(ivvae_triton: IvvaeTriton) -> None:
    async with running_app(settings_for(ivvae_triton)) as client:
        ready = await client.get("/readyz")
        models = (await client.get("/models")).json()
        via_triton = await encode(client)
        assert via_triton.status_code == 200, via_triton.text
        triton_frames = await decode_frames(client, via_triton.content)
        # FRAMES_FP32: the decoder's own float values, asked for per request
        triton_float = await decode_frames(client, via_triton.content, "float32")
    async with running_app(tiny_settings(ivvae_triton.weights)) as client:
        local_models = (await client.get("/models")).json()
        via_local = await encode(client)
        local_frames = await decode_frames(client, via_triton.content)

    assert ready.status_code == 200, ready.text
    assert ready.json()["backend"]["detail"] == "triton: 1 of 1 endpoint(s) ready"
    (served,), (local,) = models["models"], local_models["models"]
    same = ("name", "z_dim", "dim", "scale_factor", "shift_factor", "weights_sha256",
            "trained", "num_params")
    assert {k: served[k] for k in same} == {k: local[k] for k in same}
    assert served["source"] == f"triton:{local['source']}"

    latent_t, info_t = decode_latent_file(via_triton.content)
    latent_l, info_l = decode_latent_file(via_local.content)
    assert latent_t.shape == latent_l.shape == (1, 4, 6, 3, 5)
    assert np.abs(latent_t - latent_l).max() <= 1e-4
    assert (info_t.model_name, info_t.weights_sha256) == (info_l.model_name,
                                                           info_l.weights_sha256)
    assert triton_frames.shape == (21, 24, 40, 3)
    assert_frames_close(triton_frames, local_frames)
    assert triton_float.dtype == np.float32 and triton_float.shape == (21, 24, 40, 3)
    video = model_video(ivvae_triton.weights, latent_t, num_frames=21, height=24, width=40)
    assert np.abs(triton_float - video[0].transpose(1, 2, 3, 0)).max() <= 1e-4
    # Every session ended its sequence: nothing waits for the time-to-live.
    for model in ("ivvae_encoder", "ivvae_decoder"):
        assert triton_metric(ivvae_triton, "ivvae_open_sequences", model) == 0


async def test_concurrent_videos_are_batched_and_match_separate_runs(
        ivvae_triton: IvvaeTriton) -> None:
    videos = [media.make_video(None, frames=17, width=32, height=16, mirror=bool(i % 2),
                               fps=24 + i) for i in range(4)]
    async with running_app(settings_for(ivvae_triton)) as client:
        separate = [await encode(client, v) for v in videos]
    before = executions_by_batch_size(ivvae_triton, "ivvae_encoder")
    # A new app: an empty result cache, so every video really goes to Triton again.
    async with running_app(settings_for(ivvae_triton)) as client:
        together = await asyncio.gather(*(encode(client, v) for v in videos))
    after = executions_by_batch_size(ivvae_triton, "ivvae_encoder")

    for alone, concurrent in zip(separate, together, strict=True):
        assert alone.status_code == concurrent.status_code == 200
        assert concurrent.headers["x-cache"] == "miss"
        a, _ = decode_latent_file(alone.content)
        b, _ = decode_latent_file(concurrent.content)
        assert np.abs(a - b).max() <= 1e-4
    batched = {size: n - before.get(size, 0) for size, n in after.items() if size > 1}
    assert sum(batched.values()) > 0, f"no batched execution: {before} -> {after}"


async def test_readyz_follows_triton_and_requests_fail_with_503_when_it_is_down(
        ivvae_triton: IvvaeTriton) -> None:
    dead = f"127.0.0.1:{free_port()}"
    settings = settings_for(ivvae_triton, triton_url=dead, triton_connect_retries=1)
    async with running_app(settings) as client:
        ready = await client.get("/readyz")
        encoded = await encode(client)
        models = await client.get("/models")
    assert ready.status_code == 503
    assert ready.json()["backend"]["ready"] is False
    assert dead in ready.json()["backend"]["detail"]
    assert encoded.status_code == 503 and encoded.json()["error"] == "backend_unavailable"
    assert models.status_code == 503


async def test_first_step_retries_on_the_next_endpoint(ivvae_triton: IvvaeTriton) -> None:
    dead = f"127.0.0.1:{free_port()}"
    settings = settings_for(ivvae_triton, triton_url=f"{dead},{ivvae_triton.server.grpc_url}",
                            triton_connect_retries=1)
    async with running_app(settings) as client:
        ready = await client.get("/readyz")
        backend: TritonBackend = client.app.state.service.backend  # type: ignore[attr-defined]
        backend._served.clear()  # forget what the probe saw: the dead endpoint looks usable
        assert backend._in_flight[dead] == 0
        encoded = await encode(client)
    assert ready.status_code == 200
    assert ready.json()["backend"]["detail"] == "triton: 1 of 2 endpoint(s) ready"
    assert encoded.status_code == 200, encoded.text


async def test_dns_endpoint(ivvae_triton: IvvaeTriton) -> None:
    settings = settings_for(ivvae_triton, triton_url=f"dns:///{ivvae_triton.server.grpc_url}")
    async with running_app(settings) as client:
        encoded = await encode(client, media.make_video(None, frames=1, width=16, height=8))
    assert encoded.status_code == 200, encoded.text


async def test_a_slow_step_is_a_504(ivvae_triton: IvvaeTriton) -> None:
    async with running_app(settings_for(ivvae_triton, triton_timeout_s=1e-4)) as client:
        encoded = await encode(client)
    assert encoded.status_code == 504, encoded.text
    assert encoded.json()["error"] == "deadline_exceeded"


async def test_model_errors_map_to_the_services_errors(ivvae_triton: IvvaeTriton) -> None:
    backend = TritonBackend(settings_for(ivvae_triton), Metrics())
    await backend.start()
    try:
        name = backend.default_model
        session = backend.encode_session(name)
        try:
            with pytest.raises(InvalidInput, match="first step takes 1 frame"):
                await session.first(np.zeros((1, 5, 8, 8, 3), np.uint8))
        finally:
            await session.close()
        session = backend.encode_session(name)
        try:
            await session.first(np.zeros((1, 1, 8, 8, 3), np.uint8))
            with pytest.raises(InvalidInput, match="size changed"):
                await session.next(np.zeros((1, 4, 16, 8, 3), np.uint8))
            mu, logvar = await session.next(np.zeros((1, 4, 8, 8, 3), np.uint8))
            assert mu.shape == logvar.shape == (1, 4, 1, 1, 1)  # the sequence went on
        finally:
            await session.close()
        decoder = backend.decode_session(name)
        try:
            with pytest.raises(InvalidLatent, match="channels"):
                await decoder.first(np.zeros((1, 6, 1, 1, 1), np.float32))
        finally:
            await decoder.close()
    finally:
        await backend.close()


async def test_a_sequence_meant_for_other_weights_is_refused(ivvae_triton: IvvaeTriton) -> None:
    import dataclasses

    backend = TritonBackend(settings_for(ivvae_triton, triton_connect_retries=0), Metrics())
    await backend.start()
    try:
        assert backend._info is not None
        backend._info = dataclasses.replace(backend._info, weights_sha256="f" * 64)
        session = backend.encode_session(backend.default_model)
        with pytest.raises(BackendUnavailable, match="serves weights"):
            await session.first(np.zeros((1, 1, 8, 8, 3), np.uint8))
        await session.close()
    finally:
        await backend.close()


async def test_precision_must_agree_with_the_gateway(ivvae_triton: IvvaeTriton) -> None:
    settings = settings_for(ivvae_triton, encode_precision="bfloat16")
    async with running_app(settings) as client:
        ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert "make them agree" in ready.json()["backend"]["detail"]


def test_endpoint_forms() -> None:
    assert parse_endpoints(" a:1, b:2 ,") == (["a:1", "b:2"], None)
    assert parse_endpoints("dns:///triton.ns.svc:8001") == ([], ("triton.ns.svc", 8001))
    for bad in ("", "host", "dns://authority/name:1", "dns:///name", "a:b"):
        with pytest.raises(ValueError):
            parse_endpoints(bad)


def test_the_backend_module_does_not_need_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys, ivvae.backends.triton, ivvae.triton.contract\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=60)


async def test_a_stopped_triton_fails_new_requests_at_once_then_recovers(
        ivvae_triton: IvvaeTriton) -> None:
    """SIGSTOP (a hung server: connections accepted, nothing answered): once the health
    watcher has seen it, a new request is a 503 in under 2 s instead of waiting out
    triton_timeout_s; after SIGCONT requests work again."""
    async with running_app(settings_for(ivvae_triton, triton_timeout_s=60)) as client:
        backend: TritonBackend = client.app.state.service.backend  # type: ignore[attr-defined]
        assert (await encode(client)).status_code == 200
        endpoint = ivvae_triton.server.grpc_url
        group = ivvae_triton.server.process.pid  # tritonserver leads its process group
        os.killpg(group, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 30
            while not backend._down[endpoint].is_set():
                assert time.monotonic() < deadline, "the watcher never saw the hung server"
                await asyncio.sleep(0.1)
            fresh = media.make_video(None, frames=5, width=24, height=16)  # not in the cache
            start = time.monotonic()
            refused = await encode(client, fresh)
            refused_s = time.monotonic() - start
        finally:
            os.killpg(group, signal.SIGCONT)
        deadline = time.monotonic() + 60
        while (again := await encode(client, fresh)).status_code != 200:
            assert time.monotonic() < deadline, again.text
            await asyncio.sleep(0.5)
    assert refused.status_code == 503 and refused.json()["error"] == "backend_unavailable"
    assert refused_s < 2.0


def test_channels_reconnect_soon_after_triton_comes_back(monkeypatch: pytest.MonkeyPatch,
                                                         tiny_weights: Path) -> None:
    # gRPC's default reconnect backoff grows to 120 s while Triton is down: a probe saw
    # gateways stay unready for 24-35 s after a restart. The channels are made with a short
    # one (and tritonclient's own options, which passing any replaces).
    import tritonclient.grpc.aio as grpcclient

    made: list[dict[str, Any]] = []
    monkeypatch.setattr(grpcclient, "InferenceServerClient",
                        lambda url, **kw: made.append({"url": url, **kw}))
    settings = tiny_settings(tiny_weights, backend="triton", triton_url="127.0.0.1:1")
    TritonBackend(settings, Metrics())._client("127.0.0.1:1")
    (args,) = [dict(m["channel_args"]) for m in made]
    assert args["grpc.max_reconnect_backoff_ms"] <= 2000
    assert args["grpc.max_receive_message_length"] == 2**31 - 1
    assert "grpc.keepalive_timeout_ms" in args


def _stub_of(server_pid: int, model: str) -> int:
    """The python backend stub process running ``model`` under this tritonserver."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if parent == server_pid and f"/{model}/" in command:
            return int(entry.name)
    raise AssertionError(f"no stub of {model} under {server_pid}")


async def test_a_dead_model_instance_is_a_503_and_not_ready_until_triton_runs_again(
        ivvae_triton: IvvaeTriton, tmp_path: Path) -> None:
    """A model instance's python stub killed (OOM): Triton stays up, says the model is
    ready, and answers every request INTERNAL "Stub process ... is not healthy" for ever.
    That was a 500 on every request with /readyz 200; now it is a 503, /readyz says which
    model, and a restarted Triton is used again."""
    from ivvae.devtools.triton_launcher import start_triton
    from tests.triton_server import start_ivvae_triton

    server = start_ivvae_triton(ivvae_triton.export, tmp_path / "first")
    try:
        own = IvvaeTriton(server, ivvae_triton.export)
        async with running_app(settings_for(own)) as client:
            assert (await encode(client)).status_code == 200
            os.kill(_stub_of(server.process.pid, "ivvae_encoder"), signal.SIGKILL)
            fresh = media.make_video(None, frames=5, width=24, height=16)  # not cached
            for _ in range(2):  # the failed step, then a new video refused before one
                refused = await encode(client, fresh)
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"] == "backend_unavailable"
            assert "ivvae_encoder" in refused.json()["detail"]
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and "ivvae_encoder" in ready.text, ready.text
            # Triton restarted on the same ports: ready again, and videos run there.
            ports = {"http_port": server.http_port, "grpc_port": server.grpc_port,
                     "metrics_port": server.metrics_port}
            server.stop()
            server = start_triton(tmp_path / "first" / "model_repository",
                                  log_path=tmp_path / "second.log", ready_timeout=120, **ports)
            # The health watcher probes the broken endpoint by itself (nothing else asks).
            backend: TritonBackend = client.app.state.service.backend  # type: ignore[attr-defined]
            deadline = time.monotonic() + 60
            while backend._broken:
                assert time.monotonic() < deadline, backend._broken
                await asyncio.sleep(0.5)
            assert (await encode(client, fresh)).status_code == 200
            assert (await client.get("/readyz")).status_code == 200
    finally:
        server.stop()


class _FakeClient:
    """A Triton client whose models are ready and whose requests take the given times."""

    def __init__(self, delays: list[float]) -> None:
        self.delays = delays

    async def is_model_ready(self, *args: Any, **kwargs: Any) -> bool:
        return True

    async def infer(self, *args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(self.delays.pop(0))

    async def get_model_config(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {}


async def test_two_probes_of_a_recovered_endpoint_at_once_do_not_fail_readiness(
        tiny_weights: Path) -> None:
    # The watcher's probe and a readiness check's overlap: the first to finish clears the
    # mark, and the other read the mark it had cleared (a KeyError: /readyz answered 500).
    backend = TritonBackend(tiny_settings(tiny_weights, backend="triton",
                                          triton_url="t:1"), Metrics())
    backend._broken["t:1"] = "model ivvae_decoder cannot run requests: not healthy"
    backend._clients["t:1"] = _FakeClient([0.01, 0.05, 0.01, 0.05])  # type: ignore[assignment]
    cleared, probed = await asyncio.gather(backend._runs_again("t:1"), backend._probe("t:1"))
    assert cleared is True and "t:1" not in backend._broken
    assert isinstance(probed, str) and "cannot run requests" not in probed  # the config's say
