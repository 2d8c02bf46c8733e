"""ivvae.devtools.triton_launcher: a real tritonserver on free loopback ports.

The toy repository holds ``accumulator`` (sequence batching, a running sum per correlation id)
and ``sleeper`` (answers after the requested seconds). Every started server is stopped, and
the tests check that neither tritonserver nor a python stub outlives it.
"""

from __future__ import annotations

import asyncio
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
import tritonclient.grpc.aio as grpcclient
from google.protobuf import text_format
from tritonclient.grpc import InferInput, model_config_pb2
from tritonclient.utils import InferenceServerException

from ivvae.devtools.repository import EXECUTION_ENV_PATH, prepare_repository
from ivvae.devtools.triton_launcher import TritonServer, find_triton_install, start_triton

TOY_REPOSITORY = Path(__file__).parent / "toy_repository"
STUB_COMM = "triton_python_b"  # /proc comm is cut at 15 characters
LARGEST_CLIENT_SEQUENCE_ID = 2**63 - 1  # tritonclient sends integer ids as int64


# -- helpers ---------------------------------------------------------------------------------


def processes(*, pgid: int | None = None, cmdline_contains: str | None = None) -> dict[int, str]:
    """{pid: command name} of live processes, read from /proc (no psutil)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, _ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
        if state == "Z":
            continue
        if pgid is not None and int(pgrp) != pgid:
            continue
        if cmdline_contains is not None and cmdline_contains not in cmdline:
            continue
        found[int(entry.name)] = comm
    return found


def model_config(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def string_parameters(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


async def add(
    client: grpcclient.InferenceServerClient,
    sequence_id: int,
    value: int,
    *,
    start: bool = False,
    end: bool = False,
) -> tuple[int, int]:
    """One accumulator step: (running sum, correlation id the model saw)."""
    tensor = InferInput("INPUT", [1, 1], "INT64")
    tensor.set_data_from_numpy(np.array([[value]], dtype=np.int64))
    result = await client.infer(
        "accumulator",
        [tensor],
        sequence_id=sequence_id,
        sequence_start=start,
        sequence_end=end,
    )
    return int(result.as_numpy("OUTPUT")[0, 0]), int(result.as_numpy("CORRID_SEEN")[0, 0])


def executions_by_batch_size(server: TritonServer, model: str) -> dict[int, int]:
    response = httpx.get(f"http://{server.http_url}/v2/models/{model}/stats", trust_env=False)
    response.raise_for_status()
    (stats,) = response.json()["model_stats"]
    return {
        int(entry["batch_size"]): int(entry["compute_infer"]["count"])
        for entry in stats["batch_stats"]
    }


@pytest.fixture(scope="module")
def triton_available() -> None:
    try:
        find_triton_install()
    except RuntimeError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def toy_server(
    triton_available: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    workdir = tmp_path_factory.mktemp("triton")
    repository = prepare_repository(
        TOY_REPOSITORY,
        workdir / "model_repository",
        parameters={"accumulator": {"LOG_EXECUTIONS": "1"}},
    )
    server = start_triton(repository, log_path=workdir / "tritonserver.log")
    try:
        yield server
    finally:
        server.stop()
    assert not processes(pgid=server.process.pid)
    assert server.process.returncode == 0, server.log_excerpt()


def test_find_triton_install_is_idempotent(triton_available: None) -> None:
    first = find_triton_install()
    second = find_triton_install()

    assert first == second
    assert os.access(first.binary, os.X_OK)
    assert os.access(first.stub, os.X_OK)
    assert first.stub.parent == first.backend_dir / "python"


# -- a real server ----------------------------------------------------------------------------


@pytest.mark.triton
def test_server_starts_ready_on_loopback(toy_server: TritonServer) -> None:
    assert toy_server.is_ready()
    assert len({toy_server.http_port, toy_server.grpc_port, toy_server.metrics_port}) == 3
    assert toy_server.grpc_url == f"127.0.0.1:{toy_server.grpc_port}"
    names = sorted(processes(pgid=toy_server.process.pid).values())
    assert names == [STUB_COMM, STUB_COMM, "tritonserver"]  # one stub per model instance

    prepared = (toy_server.repository / "accumulator" / "config.pbtxt").read_text()
    committed = (TOY_REPOSITORY / "accumulator" / "config.pbtxt").read_text()
    assert string_parameters(model_config(prepared))[EXECUTION_ENV_PATH] == sys.prefix
    assert EXECUTION_ENV_PATH not in committed

    metrics = httpx.get(f"http://{toy_server.metrics_url}/metrics", trust_env=False)
    assert "nv_inference_request_success" in metrics.text


@pytest.mark.triton
async def test_sequences_interleave_and_are_batched(toy_server: TritonServer) -> None:
    sequences = [101, 102, 103, LARGEST_CLIENT_SEQUENCE_ID]
    before = executions_by_batch_size(toy_server, "accumulator")
    expected = dict.fromkeys(sequences, 0)
    async with grpcclient.InferenceServerClient(toy_server.grpc_url) as client:
        for step in range(4):
            # Steps of different sequences in lockstep: the `oldest` strategy batches them.
            # Steps of one sequence must never overlap (gRPC calls may arrive reordered).
            values = {seq: (step + 1) * (i + 1) for i, seq in enumerate(sequences)}
            results = await asyncio.gather(
                *(
                    add(client, seq, values[seq], start=step == 0, end=step == 3)
                    for seq in sequences
                )
            )
            for seq in sequences:
                expected[seq] += values[seq]
            assert results == [(expected[seq], seq) for seq in sequences]
    after = executions_by_batch_size(toy_server, "accumulator")

    batched = {size: n - before.get(size, 0) for size, n in after.items() if size > 1}
    assert sum(batched.values()) > 0, f"no batched execution: {before} -> {after}"
    # The extra per-model parameter reached the model (it logs each execute()).
    assert "execute batch=" in toy_server.log_path.read_text()


@pytest.mark.triton
async def test_error_fails_only_its_own_request(toy_server: TritonServer) -> None:
    sequences = [201, 202, 203, 204]
    async with grpcclient.InferenceServerClient(toy_server.grpc_url) as client:
        await asyncio.gather(*(add(client, seq, 1, start=True) for seq in sequences))
        results = await asyncio.gather(
            *(add(client, seq, -7 if seq == 202 else 1) for seq in sequences),
            return_exceptions=True,
        )
        error = results[1]
        assert isinstance(error, InferenceServerException)
        assert error.status() == "StatusCode.INVALID_ARGUMENT"
        assert error.message() == "negative input -7 for sequence 202"
        assert [results[0], *results[2:]] == [(2, 201), (2, 203), (2, 204)]

        # The failed step did not end the sequence or change its sum.
        final = await asyncio.gather(*(add(client, seq, 1, end=True) for seq in sequences))
        assert final == [(3, 201), (2, 202), (3, 203), (3, 204)]


@pytest.mark.triton
async def test_triton_rejects_steps_of_unknown_or_idle_sequences(
    toy_server: TritonServer,
) -> None:
    async with grpcclient.InferenceServerClient(toy_server.grpc_url) as client:
        with pytest.raises(InferenceServerException, match="must specify the START flag") as info:
            await add(client, 301, 1)  # never started
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"

        assert await add(client, 302, 5, start=True) == (5, 302)
        # Past max_sequence_idle_microseconds (2 s) Triton frees the slot without telling
        # the model; the next step is rejected as if the sequence never started.
        await asyncio.sleep(3)
        with pytest.raises(InferenceServerException, match="must specify the START flag"):
            await add(client, 302, 1)


@pytest.mark.triton
async def test_kill_ends_server_and_stubs_and_clients_see_unavailable(
    triton_available: None, tmp_path: Path
) -> None:
    repository = prepare_repository(TOY_REPOSITORY, tmp_path / "model_repository")
    server = start_triton(repository, models=["sleeper"], log_path=tmp_path / "tritonserver.log")
    pgid = server.process.pid
    try:
        # Explicit model control: only the sleeper is loaded, so there is a single stub.
        assert sorted(processes(pgid=pgid).values()) == [STUB_COMM, "tritonserver"]
        seconds = InferInput("SECONDS", [1, 1], "FP32")
        seconds.set_data_from_numpy(np.array([[30.0]], dtype=np.float32))
        async with grpcclient.InferenceServerClient(server.grpc_url) as client:
            in_flight = asyncio.ensure_future(client.infer("sleeper", [seconds]))
            await asyncio.sleep(0.5)
            server.kill()
            with pytest.raises(InferenceServerException) as info:
                await asyncio.wait_for(in_flight, timeout=10)
        assert info.value.status() == "StatusCode.UNAVAILABLE"
    finally:
        server.kill()

    assert server.process.returncode == -signal.SIGKILL
    assert not processes(pgid=pgid)
    assert not processes(cmdline_contains=str(repository))
    assert not server.is_ready()
    server.kill()  # idempotent, also after a kill
    server.stop()


@pytest.mark.triton
def test_start_failure_raises_with_log_tail(triton_available: None, tmp_path: Path) -> None:
    broken = tmp_path / "broken_repository" / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text(
        'name: "broken"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
    )
    (broken / "1" / "model.py").write_text(
        "class TritonPythonModel:\n"
        "    def initialize(self, args):\n"
        "        raise RuntimeError('boom in initialize')\n"
    )
    repository = prepare_repository(broken.parent, tmp_path / "model_repository")

    with pytest.raises(RuntimeError, match="boom in initialize"):
        start_triton(repository, log_path=tmp_path / "tritonserver.log", ready_timeout=30)
    assert not processes(cmdline_contains=str(repository))


@pytest.mark.triton
def test_main_serves_until_sigterm(triton_available: None, tmp_path: Path) -> None:
    output = tmp_path / "launcher.out"
    command = [
        sys.executable,
        "-m",
        "ivvae.devtools.triton_launcher",
        f"--repository={TOY_REPOSITORY}",
        f"--workdir={tmp_path}",
        "--http-port=0",
        "--grpc-port=0",
        "--metrics-port=0",
        "--model=accumulator",
    ]
    with output.open("wb") as out:
        launcher = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "tritonserver ready" not in output.read_text():
            assert launcher.poll() is None, output.read_text()
            assert time.monotonic() < deadline, output.read_text()
            time.sleep(0.05)
        assert processes(cmdline_contains=str(tmp_path / "model_repository"))

        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=20) == 0, output.read_text()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
            for pid in processes(cmdline_contains=str(tmp_path / "model_repository")):
                os.kill(pid, signal.SIGKILL)
    assert not processes(cmdline_contains=str(tmp_path / "model_repository"))
