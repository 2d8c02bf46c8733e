"""gRPC admission against a real ``ivvae serve``: the key and the RPC cap are checked before
any message is read, and streams that go quiet are dropped instead of holding their slot."""

from __future__ import annotations

import asyncio
import contextlib
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from bench._common import ServeProcess, reset_peak_rss, status_mb
from bench.bench_grpc import check_refused, refused_round

from ivvae.api.grpc import server as grpc_server
from ivvae.api.grpc.errors import ERROR_CODE_KEY
from ivvae.api.grpc.gen import ivvae_pb2 as pb
from ivvae.api.grpc.gen import ivvae_pb2_grpc as pb_grpc
from ivvae.config import Settings
from ivvae.metrics import Metrics
from tests.scrape import OPS, errors, ops, requests, scrape

KEY = "guard-test-key"
AUTH = (("authorization", f"Bearer {KEY}"),)
WRONG = (("authorization", "Bearer not-the-key"),)
CAP = 8
READ_TIMEOUT_S = 3.0  # setting up 8-20 streams must fit well inside it
SLACK_S = 20.0  # what a loaded CI machine may add to the server's own timeout


@pytest.fixture(scope="module")
def server(tiny_weights: Path) -> Iterator[ServeProcess]:
    with ServeProcess(tiny_weights, IVVAE_API_KEYS=KEY,
                      IVVAE_GRPC_MAX_CONCURRENT_RPCS=str(CAP),
                      IVVAE_GRPC_READ_TIMEOUT_S=str(READ_TIMEOUT_S),
                      IVVAE_MIN_UPLOAD_RATE="500",
                      IVVAE_TORCH_THREADS="1") as srv:
        yield srv


def _target(server: ServeProcess) -> str:
    return f"127.0.0.1:{server.grpc_port}"


def test_unauthenticated_big_messages_are_refused_without_being_buffered(
    server: ServeProcess,
) -> None:
    assert server.proc is not None
    pid = server.proc.pid
    reset_peak_rss(pid)
    before = status_mb(pid, "VmRSS")

    for _ in range(3):
        check_refused(asyncio.run(refused_round(_target(server))))
    # Buffered, 20 x 60 MB would be over a gigabyte at the peak. Unread, each stream holds
    # at most its flow-control window: 20 x 4 MiB at worst with the server's fixed windows
    # (bench/bench_grpc.py: 40-50 MB over five rounds), 114-412 MB with grpc's probed ones.
    assert status_mb(pid, "VmHWM") - before < 150


def test_the_server_fixes_its_stream_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[tuple[str, int]]] = []

    def record(*, interceptors: object, options: list[tuple[str, int]]) -> object:
        seen.append(options)
        raise RuntimeError("recorded")

    monkeypatch.setattr(grpc_server.grpc.aio, "server", record)
    for window, expected in ((4 << 20, {("grpc.http2.bdp_probe", 0),
                                         ("grpc.http2.lookahead_bytes", 4 << 20)}),
                             (0, set())):
        settings = Settings(grpc_stream_window_bytes=window)
        with pytest.raises(RuntimeError, match="recorded"):
            asyncio.run(grpc_server.start_grpc_server(
                types.SimpleNamespace(metrics=Metrics()), settings))  # type: ignore[arg-type]
        assert {o for o in seen[-1] if o[0].startswith("grpc.http2.")} == expected


def test_streams_that_go_quiet_do_not_lock_others_out(server: ServeProcess) -> None:
    async def scenario() -> tuple[list[grpc.StatusCode], float]:
        async with grpc.aio.insecure_channel(_target(server)) as channel:
            stub = pb_grpc.IVVAEStub(channel)
            idle = [stub.Encode(metadata=AUTH) for _ in range(20)]
            for call in idle:  # options, then nothing
                # (a call over the cap may be refused before the write: that is fine)
                with contextlib.suppress(asyncio.InvalidStateError, grpc.aio.AioRpcError):
                    await call.write(pb.EncodeRequest(options=pb.EncodeOptions()))
            start = time.monotonic()
            while True:  # a new client gets in once the quiet streams are dropped
                try:
                    await stub.ListModels(pb.ListModelsRequest(), metadata=AUTH, timeout=10)
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                    assert time.monotonic() - start < SLACK_S, "still locked out"
                    await asyncio.sleep(0.1)
            waited = time.monotonic() - start
            codes = []
            for call in idle:
                try:
                    async for _ in call:
                        pass
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code())
                    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        assert "no request message" in (exc.details() or "")
            return codes, waited

    codes, _ = asyncio.run(scenario())
    assert codes.count(grpc.StatusCode.UNAVAILABLE) >= 20 - CAP  # over the cap: refused
    assert grpc.StatusCode.DEADLINE_EXCEEDED in codes  # admitted, then dropped when quiet
    assert grpc.StatusCode.OK not in codes


def test_a_trickled_stream_is_cut_off_though_no_gap_is_long(server: ServeProcess) -> None:
    async def scenario() -> tuple[grpc.aio.AioRpcError, float]:
        async with grpc.aio.insecure_channel(_target(server)) as channel:
            call = pb_grpc.IVVAEStub(channel).Encode(metadata=AUTH)
            await call.write(pb.EncodeRequest(options=pb.EncodeOptions()))
            await call.initial_metadata()
            start = time.monotonic()
            # A byte every half read timeout: each gap is fine, the pace is not. The call
            # must end while this is still sending.
            while time.monotonic() - start < READ_TIMEOUT_S + SLACK_S:
                try:
                    await call.write(pb.EncodeRequest(chunk=b"\0"))
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    break
                await asyncio.sleep(READ_TIMEOUT_S / 2)
                if call.done():
                    break
            try:
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError as exc:
                return exc, time.monotonic() - start
            raise AssertionError("the trickled upload was served")

    exc, took = asyncio.run(scenario())
    assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc
    assert "too slowly" in (exc.details() or ""), exc
    assert took < READ_TIMEOUT_S + SLACK_S


def test_cap_refusal_carries_the_error_code(server: ServeProcess) -> None:
    async def scenario() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(_target(server)) as channel:
            stub = pb_grpc.IVVAEStub(channel)
            held = [stub.Encode(metadata=AUTH) for _ in range(CAP)]
            for call in held:
                await call.write(pb.EncodeRequest(options=pb.EncodeOptions()))
            for call in held:
                await call.initial_metadata()  # all admitted and reading
            try:
                await stub.ListModels(pb.ListModelsRequest(), metadata=AUTH, timeout=10)
            except grpc.aio.AioRpcError as exc:
                return exc
            finally:
                for call in held:
                    call.cancel()
            raise AssertionError("the RPC over the cap was admitted")

    before = scrape(server.url)
    exc = asyncio.run(scenario())
    assert exc.code() == grpc.StatusCode.UNAVAILABLE
    assert dict(exc.trailing_metadata() or ())[ERROR_CODE_KEY] == "overloaded"
    # Counted where served requests are: an operator can alert on it.
    after = scrape(server.url)
    assert (requests(after, "models", "grpc", "overloaded")
            == requests(before, "models", "grpc", "overloaded") + 1)
    assert errors(after, "overloaded") == errors(before, "overloaded") + 1


def test_rpc_ops_name_every_rpc() -> None:
    methods = pb.DESCRIPTOR.services_by_name["IVVAE"].methods
    assert set(grpc_server.RPC_OPS) == {f"/{grpc_server.SERVICE_NAME}/{m.name}"
                                        for m in methods}
    assert set(grpc_server.RPC_OPS.values()) <= OPS


def test_refusals_are_counted_under_known_ops_only(server: ServeProcess) -> None:
    async def scenario() -> list[grpc.StatusCode]:
        codes = []
        async with grpc.aio.insecure_channel(_target(server)) as channel:
            stub = pb_grpc.IVVAEStub(channel)
            calls: list[Any] = [
                stub.ListModels(pb.ListModelsRequest(), metadata=WRONG, timeout=10),
                stub.ListModels(pb.ListModelsRequest(), timeout=10),  # no key at all
                # Method names from the wire: one that is not ivvae's, one of no service.
                channel.unary_unary("/ivvae.v1.IVVAE/NoSuchRpc")(b"", metadata=WRONG,
                                                                  timeout=10),
                channel.unary_unary("/junk.Service/Junk")(b"", metadata=WRONG, timeout=10),
                # A key, but a message that does not parse: refused before the handler.
                channel.unary_unary("/ivvae.v1.IVVAE/EncodeUnary")(b"\x0a\xff", metadata=AUTH,
                                                                    timeout=10),
            ]
            for call in calls:
                try:
                    await call
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code())
            encode = stub.Encode(metadata=WRONG, timeout=10)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await encode.write(pb.EncodeRequest(options=pb.EncodeOptions()))
            try:
                await encode.read()
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
        return codes

    before = scrape(server.url)
    codes = asyncio.run(scenario())
    after = scrape(server.url)
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    assert codes == [unauthenticated] * 4 + [grpc.StatusCode.INVALID_ARGUMENT,
                                             unauthenticated]

    def added(op: str, outcome: str) -> float:
        return requests(after, op, "grpc", outcome) - requests(before, op, "grpc", outcome)

    assert added("models", "unauthorized") == 2
    assert added("other", "unauthorized") == 2
    assert added("encode", "unauthorized") == 1
    assert added("encode", "invalid_input") == 1
    assert errors(after, "unauthorized") - errors(before, "unauthorized") == 5
    assert errors(after, "invalid_input") - errors(before, "invalid_input") == 1
    # The method names from the wire made no label values.
    assert ops(after) <= OPS
