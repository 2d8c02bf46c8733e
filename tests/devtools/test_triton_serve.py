"""``ivvae triton-serve`` as a process: the ONNX Runtime models, the time-to-live of
abandoned sequences, and Triton dying in the middle of a request.

One server for the module, started by the command with a two-second time-to-live over the
ONNX export (placed where the command looks for it, so it does not export again). The last
test kills it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from ivvae.backends.triton import TritonBackend
from ivvae.core.artifacts import read_manifest
from ivvae.devtools.triton_launcher import find_triton_install
from ivvae.devtools.triton_serve import artifact_key, ensure_artifacts
from ivvae.errors import BackendUnavailable
from ivvae.latents import decode_latent_file
from ivvae.metrics import Metrics
from tests import media
from tests.devtools.test_triton_launcher import processes
from tests.service_fixtures import running_app, tiny_settings
from tests.triton_server import TinyExport

pytestmark = pytest.mark.triton

TTL_S = 2.0
READY = re.compile(r"tritonserver ready: http (\S+) grpc (\S+) metrics (\S+)")


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    output: Path
    workdir: Path
    weights: Path
    http_url: str
    grpc_url: str
    metrics_url: str

    def tritonserver_pid(self) -> int:
        [pid] = [p for p, name in processes(
            cmdline_contains=str(self.workdir / "model_repository")).items()
            if name == "tritonserver"]
        return pid

    def metric(self, name: str, model: str) -> float:
        text = httpx.get(f"http://{self.metrics_url}/metrics", trust_env=False).text
        values = re.findall(rf'^{name}{{[^}}]*model="{model}"[^}}]*}} (\S+)$', text, re.M)
        return sum(float(v) for v in values)


@pytest.fixture(scope="module")
def served(tiny_exports: Callable[[str], TinyExport],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    try:
        find_triton_install()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    export = tiny_exports("onnx")
    workdir = tmp_path_factory.mktemp("triton-serve")
    key = artifact_key(read_manifest(export.directory).weights_sha256, "onnx")
    shutil.copytree(export.directory, workdir / "artifacts" / f"onnx-{key}")
    output = workdir / "triton-serve.out"
    command = [sys.executable, "-m", "ivvae.cli", "triton-serve", "--weights",
               str(export.weights), "--format", "onnx", "--workdir", str(workdir),
               "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
               "--sequence-ttl", str(TTL_S), "--threads", "1"]
    with output.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not (match := READY.search(output.read_text())):
            assert process.poll() is None, output.read_text()
            assert time.monotonic() < deadline, output.read_text()
            time.sleep(0.1)
        yield Served(process, output, workdir, export.weights, *match.groups())
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid in processes(cmdline_contains=str(workdir / "model_repository")):
            os.kill(pid, signal.SIGKILL)


def settings(served: Served, **kw: Any) -> Any:
    return tiny_settings(served.weights, backend="triton", triton_url=served.grpc_url, **kw)


async def test_the_command_serves_the_onnx_models_like_the_local_backend(
        served: Served) -> None:
    assert "exporting" not in served.output.read_text()  # the placed export was current
    video = media.make_video(None, frames=9, width=24, height=16)
    files = {"file": ("v.mp4", video, "video/mp4")}
    async with running_app(settings(served)) as client:
        via_triton = await client.post("/encode", files=files)
        frames_t = await client.post("/decode?format=frames", content=via_triton.content,
                                     headers={"content-type": "application/octet-stream"})
    async with running_app(tiny_settings(served.weights)) as client:
        via_local = await client.post("/encode", files=files)
        frames_l = await client.post("/decode?format=frames", content=via_triton.content,
                                     headers={"content-type": "application/octet-stream"})
    assert via_triton.status_code == frames_t.status_code == 200, via_triton.text
    a, _ = decode_latent_file(via_triton.content)
    b, _ = decode_latent_file(via_local.content)
    assert np.abs(a - b).max() <= 1e-4
    from ivvae.safetensors_io import loads

    ft = loads(frames_t.content)[0]["frames"].array.astype(np.int16)
    fl = loads(frames_l.content)[0]["frames"].array.astype(np.int16)
    diff = np.abs(ft - fl)
    # ONNX Runtime sums floats in another order than torch: a value on a rounding boundary
    # may land one level off (the export verification measured 20 of 319,488 values).
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 1e-3 * diff.size


async def test_an_abandoned_sequence_is_evicted_after_its_ttl(served: Served) -> None:
    backend = TritonBackend(settings(served), Metrics())
    await backend.start()
    try:
        session = backend.encode_session(backend.default_model)
        evicted = served.metric("ivvae_evicted_sequences", "ivvae_encoder")
        await session.first(np.zeros((1, 1, 8, 8, 3), np.uint8))
        assert served.metric("ivvae_open_sequences", "ivvae_encoder") == 1
        # The gateway "forgets" the sequence (as if it crashed): no step, no release.
        deadline = time.monotonic() + TTL_S + 5
        while served.metric("ivvae_open_sequences", "ivvae_encoder") > 0:
            assert time.monotonic() < deadline, "the sequence was not evicted"
            time.sleep(0.2)
        assert served.metric("ivvae_evicted_sequences", "ivvae_encoder") == evicted + 1
        # Triton's own idle limit is the same TTL (--sequence-ttl reaches it), so either
        # Triton or the model notices first: both say the sequence is gone.
        with pytest.raises(BackendUnavailable, match=r"lost the video's sequence|"
                                                     r"no state .* idle for more than 2 s"):
            await session.next(np.zeros((1, 4, 8, 8, 3), np.uint8))
        await session.close()
    finally:
        await backend.close()


def test_the_sequence_ttl_reaches_triton(served: Served) -> None:
    """``--sequence-ttl`` sets Triton's own idle limit too (the committed config says 120 s),
    so Triton keeps a sequence's slot exactly as long as the model keeps its state."""
    for model in ("ivvae_encoder", "ivvae_decoder"):
        config = httpx.get(f"http://{served.http_url}/v2/models/{model}/config",
                           trust_env=False).json()
        idle = int(config["sequence_batching"]["max_sequence_idle_microseconds"])
        assert idle == round(TTL_S * 1e6)
        assert config["parameters"]["SEQUENCE_TTL_S"]["string_value"] == f"{TTL_S:g}"


async def test_killing_triton_mid_request_is_a_503_and_caches_nothing(served: Served) -> None:
    video = media.make_video(None, frames=33, width=24, height=16)
    async with running_app(settings(served, groups_per_step=1)) as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        backend: TritonBackend = service.backend
        open_session = backend.encode_session
        steps = 0

        def encode_session(model: str) -> Any:
            session = open_session(model)
            step = session.next

            async def next_then_crash(frames: np.ndarray) -> Any:
                nonlocal steps
                steps += 1
                if steps == 2:  # mid-video: the server dies between two steps
                    os.killpg(served.tritonserver_pid(), signal.SIGKILL)
                return await step(frames)

            session.next = next_then_crash  # type: ignore[method-assign]
            return session

        backend.encode_session = encode_session  # type: ignore[method-assign]
        response = await client.post("/encode", files={"file": ("v.mp4", video, "video/mp4")})
        ready = await client.get("/readyz")
        cache_writes = service.metrics.cache.labels("write")._value.get()

    assert response.status_code == 503, response.text
    assert response.json()["error"] == "backend_unavailable"
    assert cache_writes == 0
    assert ready.status_code == 503
    # The command notices that its server died and exits with an error.
    assert served.process.wait(timeout=30) == 1
    assert "tritonserver exited" in served.output.read_text()
    assert not processes(cmdline_contains=str(served.workdir / "model_repository"))


def test_ensure_artifacts_reuses_a_current_export(
        tiny_exports: Callable[[str], TinyExport], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ivvae.model import export as export_module

    export = tiny_exports("torchscript")
    key = artifact_key(read_manifest(export.directory).weights_sha256, "torchscript")
    current = tmp_path / f"torchscript-{key}"
    shutil.copytree(export.directory, current)
    stale = tmp_path / "torchscript-0123456789abcdef"
    stale.mkdir()

    def no_export(*args: object, **kw: object) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(export_module, "export_artifacts", no_export)
    assert ensure_artifacts(str(export.weights), "torchscript", tmp_path) == current
    assert stale.exists()  # removed only when a new export replaces it


def test_a_long_sequence_ttl_lifts_the_triton_idle_limit(
        tiny_exports: Callable[[str], TinyExport], tmp_path: Path) -> None:
    """The other way: a TTL above the committed 120 s raises Triton's limit with it."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from ivvae.devtools.triton_serve import prepare

    prepared = prepare(tiny_exports("onnx").directory, tmp_path, sequence_ttl_s=300)
    for model in ("ivvae_encoder", "ivvae_decoder"):
        config = text_format.Parse((prepared / model / "config.pbtxt").read_text(),
                                   model_config_pb2.ModelConfig())
        assert config.sequence_batching.max_sequence_idle_microseconds == 300_000_000
