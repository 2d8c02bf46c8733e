"""A cancelled stream, or one past its deadline, frees what it held: the backend session
(``ivvae_active_sessions``), the pipeline's slot and the RPC count."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from ivvae.api.grpc.gen import ivvae_pb2 as pb
from ivvae.api.grpc.gen import ivvae_pb2_grpc as pb_grpc
from tests import media
from tests.api.grpc.conftest import decode_requests, encode_requests, grpc_encode
from tests.grpc_fixtures import ServerThread, server_thread
from tests.service_fixtures import tiny_settings

FRAMES = 33  # 1 + 8 groups of 4: nine model steps each way with groups_per_step=1


@pytest.fixture(scope="module")
def server(tiny_weights: Path) -> Iterator[ServerThread]:
    with server_thread(tiny_settings(tiny_weights, groups_per_step=1)) as srv:
        yield srv


class _Slow:
    """A backend session whose later steps take at least ``delay`` seconds each, so that a
    test can cancel reliably in the middle of a stream."""

    def __init__(self, session: Any, delay: float) -> None:
        self.session, self.delay = session, delay

    async def first(self, x: Any) -> Any:
        return await self.session.first(x)

    async def next(self, x: Any) -> Any:
        await asyncio.sleep(self.delay)
        return await self.session.next(x)

    async def close(self) -> None:
        await self.session.close()


@pytest.fixture
def slow_steps(server: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = server.service.backend
    for kind in ("encode_session", "decode_session"):
        make = getattr(backend, kind)
        monkeypatch.setattr(backend, kind,
                            lambda model, *args, make=make: _Slow(make(model, *args),
                                                                  delay=0.2))


def _gauge(server: ServerThread, name: str, **labels: str) -> float:
    value = server.service.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def _settled(server: ServerThread, timeout: float = 10) -> None:
    """Wait until nothing is held: no session, no RPC in flight, every pipeline slot free."""
    slots = server.service.pipeline._slots
    deadline = time.monotonic() + timeout
    while True:
        held = {
            "encode sessions": _gauge(server, "ivvae_active_sessions", kind="encode"),
            "decode sessions": _gauge(server, "ivvae_active_sessions", kind="decode"),
            "in flight": _gauge(server, "ivvae_in_flight_requests"),
            "busy slots": server.settings.max_concurrent_requests - slots._value,
        }
        if not any(held.values()):
            return
        assert time.monotonic() < deadline, f"still held after cancel: {held}"
        await asyncio.sleep(0.02)


async def test_cancelled_decode_closes_its_session(server: ServerThread,
                                                   slow_steps: None) -> None:
    video = media.make_video(None, frames=FRAMES, width=16, height=16)
    _, latent = await grpc_encode(server.grpc_target, video)
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        call = pb_grpc.IVVAEStub(channel).Decode(
            decode_requests(latent, format=pb.DECODE_FORMAT_FRAMES))
        assert (await call.read()).WhichOneof("part") == "info"
        assert (await call.read()).WhichOneof("part") == "chunk"  # frame 0 of 33
        assert _gauge(server, "ivvae_active_sessions", kind="decode") == 1
        call.cancel()
    await _settled(server)
    assert _gauge(server, "ivvae_requests_total", op="decode", transport="grpc",
                  outcome="cancelled") >= 1


async def test_cancelled_encode_closes_its_session(server: ServerThread,
                                                   slow_steps: None) -> None:
    video = media.make_video(None, frames=FRAMES, width=16, height=16, pattern="gradient")
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        call = pb_grpc.IVVAEStub(channel).Encode(encode_requests(video))
        first = await call.read()
        assert first.WhichOneof("part") == "progress"  # the model has started on it
        assert _gauge(server, "ivvae_active_sessions", kind="encode") == 1
        call.cancel()
    await _settled(server)
    # ... and the service still works
    _, latent = await grpc_encode(server.grpc_target, video)
    assert latent


async def test_deadline_exceeded_frees_the_session(server: ServerThread,
                                                    slow_steps: None) -> None:
    video = media.make_video(None, frames=FRAMES, width=24, height=24)  # not cached
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        call = pb_grpc.IVVAEStub(channel).Encode(encode_requests(video), timeout=0.3)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            async for _ in call:
                pass
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await _settled(server)


@pytest.mark.parametrize("batch", [1, 2], ids=["stream", "batch"])
async def test_a_decode_whose_client_reads_nothing_ends_at_the_request_timeout(
        tiny_weights: Path, batch: int) -> None:
    # A stream's write past the request timeout failed, and the handler then waited to
    # abort the RPC behind that very write, for as long as the client stayed connected; a
    # batch's whole file (as Encode's answer, which goes through the same in_time) was
    # written with no clock at all. Either way the RPC's slot under
    # IVVAE_GRPC_MAX_CONCURRENT_RPCS (here 1) and its in-flight count stayed taken. Now the
    # handler ends without a status; only gRPC's buffer of the stream (a chunk) waits.
    import numpy as np

    latent = np.random.default_rng(batch).standard_normal((batch, 4, 9, 16, 16))
    settings = tiny_settings(tiny_weights, request_timeout_s=3, grpc_max_concurrent_rpcs=1)
    with server_thread(settings) as srv:
        # Without BDP probing the client's window stays at 64 KiB: a stream it does not
        # read stops the server's writes (33 frames of 128x128 are 1.6 MB an item).
        async with grpc.aio.insecure_channel(srv.grpc_target,
                                             options=[("grpc.http2.bdp_probe", 0)]) as channel:
            stub = pb_grpc.IVVAEStub(channel)
            call = stub.Decode(decode_requests(
                latent.astype(np.float32).tobytes(), format=pb.DECODE_FORMAT_FRAMES,
                tensor=pb.TensorSpec(shape=list(latent.shape), dtype="float32")))
            await call.initial_metadata()  # then reads nothing
            await _settled(srv, timeout=60)
            # its slot is free while it is still connected
            models = await stub.ListModels(pb.ListModelsRequest(), timeout=10)
            assert models.default_model
            call.cancel()
