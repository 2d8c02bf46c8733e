"""The local stack (redis-server + tritonserver + gateway as processes).

End to end: up, encode/decode a real clip over HTTP and gRPC, a Redis cache hit on repeat,
Triton killed -> 503 and /readyz failing, `up` again -> recovered, down -> nothing left
running. Then, with plain processes standing in for the services: ports checked before
anything starts, a service counts as running only when its recorded process holds its
ports, `status` exits non-zero when a part is down, and `down` stops only what was recorded
(by pid and start time).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from ivvae.cli import main
from ivvae.client import Client
from ivvae.core.ports import PortInUse
from ivvae.latents import decode_latent_file
from ivvae.stack import Proc, Stack, StackConfig
from ivvae.video import open_video
from tests import media
from tests.redis_server import free_port
from tests.service_fixtures import write_tiny_weights


def _wait_for(predicate: object, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.25)
    return False


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.redis
def test_local_stack_end_to_end(tmp_path: Path) -> None:
    weights = write_tiny_weights(tmp_path / "tiny.safetensors")
    cfg = StackConfig(
        workdir=tmp_path / "stack", weights=str(weights), http_port=free_port(),
        grpc_port=free_port(), redis_port=free_port(), triton_http_port=free_port(),
        triton_grpc_port=free_port(), triton_metrics_port=free_port(),
        extra_env={"IVVAE_LOG_LEVEL": "warning", "IVVAE_REQUEST_TIMEOUT_S": "300",
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
        # The stack recorded it (by pid and start time) under `ivvae triton-serve`.
        recorded = [p for name in ("redis", "triton", "gateway") for p in stack._recorded(name)]
        triton_server = stack._recorded("triton")[1:]
        assert [Path(f"/proc/{p.pid}/exe").resolve().name for p in triton_server] == [
            "tritonserver"]
        for proc in triton_server:
            os.kill(proc.pid, signal.SIGKILL)
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
        recorded += [p for name in ("redis", "triton", "gateway") for p in stack._recorded(name)]
    finally:
        stack.down()
    assert not [p for p in recorded if p.alive()]
    assert not stack.running() and not stack.state_path.exists()
    for port in (cfg.http_port, cfg.grpc_port, cfg.redis_port, cfg.triton_grpc_port):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)


# -- truthfulness, with plain processes standing in for the services --------------------------


def _spawn(*argv: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(list(argv), start_new_session=True)


def _listener(port: int) -> subprocess.Popen[bytes]:
    """A process that listens on ``port`` (and answers nothing)."""
    code = ("import socket, sys, time; s = socket.socket(); "
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
            f"s.bind(('127.0.0.1', {port})); s.listen(); sys.stdout.write('up\\n'); "
            "sys.stdout.flush(); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    return proc


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _record(stack: Stack, name: str, procs: list[Proc], ports: dict[str, int]) -> None:
    state = stack.state()
    state["services"][name] = {"procs": [{"pid": p.pid, "start": p.start} for p in procs],
                               "cmd": [], "log": "", "ports": ports}
    stack.dir.mkdir(parents=True, exist_ok=True)
    stack._save(state)


def _free_ports_config(workdir: Path) -> StackConfig:
    return StackConfig(workdir=workdir, http_port=free_port(), grpc_port=free_port(),
                       redis_port=free_port(), triton_http_port=free_port(),
                       triton_grpc_port=free_port(), triton_metrics_port=free_port())


def test_up_checks_every_port_before_starting_anything(tmp_path: Path,
                                                      procs: list[subprocess.Popen[bytes]]
                                                      ) -> None:
    cfg = _free_ports_config(tmp_path / "stack")
    other_server = _listener(cfg.http_port)  # e.g. a `./dev serve` left running
    procs.append(other_server)
    stack = Stack(cfg)
    with pytest.raises(PortInUse) as exc:
        stack.up()
    assert f"port {cfg.http_port}" in str(exc.value) and "gateway HTTP" in str(exc.value)
    assert stack.state()["services"] == {}  # nothing was started, nothing recorded
    code = main(["stack", "up", "--workdir", str(cfg.workdir), "--http-port",
                 str(cfg.http_port), "--grpc-port", str(cfg.grpc_port), "--redis-port",
                 str(cfg.redis_port), "--triton-http-port", str(cfg.triton_http_port),
                 "--triton-grpc-port", str(cfg.triton_grpc_port), "--triton-metrics-port",
                 str(cfg.triton_metrics_port)])
    assert code == 2 and other_server.poll() is None


def test_status_counts_only_processes_that_hold_their_ports(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]],
        capsys: pytest.CaptureFixture[str]) -> None:
    stack = Stack(StackConfig(workdir=tmp_path / "stack"))
    redis_port, gateway_port, gateway_grpc = free_port(), free_port(), free_port()
    ours = _listener(redis_port)
    foreign = _listener(gateway_port)  # answers on the gateway's port, but is not ours
    idle = _spawn("sleep", "600")  # the recorded gateway: alive, listening on nothing
    finished = _spawn("true")
    procs += [ours, foreign, idle, finished]
    dead = Proc.of(finished.pid)
    finished.wait()
    _record(stack, "redis", [Proc.of(ours.pid)], {"Redis": redis_port})
    _record(stack, "triton", [dead], {"Triton HTTP": free_port()})
    _record(stack, "gateway", [Proc.of(idle.pid)],
            {"gateway HTTP": gateway_port, "gateway gRPC": gateway_grpc})

    status = stack.status()
    assert status["redis"].running and status["redis"].pid == ours.pid
    assert not status["triton"].running and "exited" in status["triton"].problem
    assert not status["gateway"].running
    assert f"does not listen on gateway HTTP port {gateway_port}" in status["gateway"].problem
    assert stack.running() == {"redis": ours.pid}
    assert main(["stack", "status", "--workdir", str(stack.dir)]) == 1
    out = capsys.readouterr().out
    assert "redis    running" in out and "triton   stopped" in out and "not serving" in out


def test_down_stops_only_the_recorded_processes(tmp_path: Path,
                                                procs: list[subprocess.Popen[bytes]]) -> None:
    workdir = tmp_path / "stack"
    stack = Stack(StackConfig(workdir=workdir))
    # Not ours, though its command line names the work directory: it must survive.
    bystander = _spawn("sh", "-c", f"sleep 600 # {workdir.absolute()}")
    # Recorded with a start time that is not its own: a recycled pid. It must survive.
    recycled = _spawn("sleep", "600")
    # Ours: the leader of a process group with a child in it (as tritonserver's stubs).
    leader = _spawn("sh", "-c", "sleep 600 & wait")
    procs += [bystander, recycled, leader]

    assert main(["stack", "down", "--workdir", str(workdir)]) == 0  # no stack: kills nothing
    assert bystander.poll() is None and recycled.poll() is None and leader.poll() is None

    assert _wait_for(lambda: len(Proc.of(leader.pid).tree()) == 2)
    child = next(pid for pid in Proc.of(leader.pid).tree() if pid != leader.pid)
    child_proc = Proc.of(child)
    stale = Proc.of(recycled.pid)
    _record(stack, "redis", [Proc.of(leader.pid)], {"Redis": free_port()})
    _record(stack, "triton", [Proc(stale.pid, stale.start + 1)], {"Triton HTTP": free_port()})
    stack.down(timeout=5)
    assert leader.wait(10) is not None and not child_proc.alive()
    assert bystander.poll() is None and recycled.poll() is None
    assert not stack.state_path.exists()
