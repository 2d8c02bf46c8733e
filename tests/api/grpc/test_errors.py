"""Bad input gets the mapped status code and the HTTP API's error code, never INTERNAL or
UNKNOWN; API keys; the RPC cap; the server answers the next good request."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ivvae.api.grpc.errors import ERROR_CODE_KEY
from ivvae.api.grpc.gen import ivvae_pb2 as pb
from ivvae.api.grpc.gen import ivvae_pb2_grpc as pb_grpc
from ivvae.client import AsyncClient
from ivvae.errors import TooLarge
from ivvae.safetensors_io import dumps
from tests import media
from tests.api.grpc.conftest import decode_requests, encode_requests
from tests.grpc_fixtures import ServerThread, server_thread
from tests.service_fixtures import tiny_settings

KEY = "s3cret"
AUTH = (("authorization", f"Bearer {KEY}"),)
GOOD = media.make_video(None, frames=5, width=16, height=16)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def server(tiny_weights: Path) -> Iterator[ServerThread]:
    settings = tiny_settings(tiny_weights, max_frames=32, max_upload_bytes=200_000,
                             api_keys=f"other,{KEY}", grpc_max_concurrent_rpcs=1,
                             grpc_max_message_bytes=2 * 1024 * 1024)
    with server_thread(settings) as srv:
        yield srv


def _truncated_mp4() -> bytes:
    data = media.make_video(None, frames=30, width=64, height=48)
    return data[: len(data) // 2]


async def _messages(*messages: Any) -> AsyncIterator[Any]:
    for m in messages:
        yield m


ENCODE: dict[str, tuple[Callable[[], AsyncIterator[Any]], grpc.StatusCode, str]] = {
    "no bytes": (lambda: _messages(pb.EncodeRequest(options=pb.EncodeOptions())), INVALID,
                 "empty_input"),
    "no messages": (lambda: _messages(), INVALID, "empty_input"),
    "random bytes": (lambda: encode_requests(np.random.default_rng(0).bytes(5000)), INVALID,
                     "unsupported_media"),
    "audio only": (lambda: encode_requests(media.make_audio_only()), INVALID,
                   "unsupported_media"),
    "truncated mp4": (lambda: encode_requests(_truncated_mp4()), INVALID, "corrupt_media"),
    "8192x8192": (lambda: encode_requests(media.make_huge_png(8192, 8192)), EXHAUSTED,
                  "too_large"),
    "too many frames": (lambda: encode_requests(
        media.make_video(None, frames=40, width=8, height=8)), EXHAUSTED, "too_large"),
    "declared oversized": (lambda: encode_requests(b"\0" * 300_000, size_bytes=300_000),
                           EXHAUSTED, "too_large"),
    "declared size wrong": (lambda: encode_requests(GOOD, size_bytes=len(GOOD) + 1), INVALID,
                            "invalid_input"),
    "unknown model": (lambda: encode_requests(GOOD, model="nope"), INVALID, "unknown_model"),
    "bad dtype": (lambda: encode_requests(GOOD, dtype="int8"), INVALID, "invalid_input"),
    "seed without sample": (lambda: encode_requests(GOOD, seed=3), INVALID, "invalid_input"),
    "options twice": (lambda: _messages(pb.EncodeRequest(options=pb.EncodeOptions()),
                                        pb.EncodeRequest(chunk=GOOD),
                                        pb.EncodeRequest(options=pb.EncodeOptions())),
                      INVALID, "invalid_input"),
    "empty message": (lambda: _messages(pb.EncodeRequest(chunk=GOOD), pb.EncodeRequest()),
                      INVALID, "invalid_input"),
    # Each once ended INTERNAL: "²" passes str.isdigit, a rate below 1/1001 fps failed in
    # the MP4 writer after the model ran, and "1e100000000" blocked the loop for minutes.
    "resize ²": (lambda: encode_requests(GOOD, resize="²"), INVALID, "invalid_input"),
    "fps 1/5000": (lambda: encode_requests(GOOD, fps="1/5000"), INVALID, "invalid_input"),
    "fps 1e100000000": (lambda: encode_requests(GOOD, fps="1e100000000"), INVALID,
                        "invalid_input"),
    "tensor fps 1e400": (lambda: encode_requests(
        bytes(5 * 16 * 16 * 3), frames=pb.TensorSpec(shape=[5, 16, 16, 3], fps="1e400")),
        INVALID, "invalid_input"),
    "tensor fps 1e-4": (lambda: encode_requests(
        bytes(5 * 16 * 16 * 3), frames=pb.TensorSpec(shape=[5, 16, 16, 3], fps="0.0001")),
        INVALID, "invalid_input"),
}


async def _status(method: Any, requests: AsyncIterator[Any],
                  metadata: Any = AUTH) -> tuple[grpc.StatusCode, str | None]:
    """Status and error code of a streaming call, driven as the .proto advises: the first
    message, then the rest only once the server's headers say go (a grpc.aio client that
    is still writing when the server ends the RPC reports INTERNAL: grpc/grpc#36066)."""
    call = method(metadata=metadata)
    messages = [m async for m in requests]
    try:
        if messages:
            await call.write(messages[0])
            await call.initial_metadata()
        if not call.done():
            for message in messages[1:]:
                await call.write(message)
            await call.done_writing()
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code(), dict(exc.trailing_metadata() or ()).get(ERROR_CODE_KEY)
    return grpc.StatusCode.OK, None


async def _good_encode_works(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await pb_grpc.IVVAEStub(channel).EncodeUnary(
            pb.EncodeUnaryRequest(video=GOOD), metadata=AUTH)
    assert reply.info.num_frames == 5


@pytest.mark.parametrize("case", sorted(ENCODE))
async def test_bad_encode_streams(server: ServerThread, case: str) -> None:
    make, status, code = ENCODE[case]
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        got = await _status(pb_grpc.IVVAEStub(channel).Encode, make())
    assert got == (status, code)
    await _good_encode_works(server.grpc_target)


@pytest.mark.parametrize(("declared", "status", "code"), [
    (None, EXHAUSTED, "too_large"),  # past max_upload_bytes
    (1000, INVALID, "invalid_input"),  # past its own declared size (read to the end before)
])
def test_oversized_stream_is_cut_off_early(server: ServerThread, declared: int | None,
                                           status: grpc.StatusCode, code: str) -> None:
    """Refused as soon as the stream passes its limit, not after the whole upload. The sync
    API: it reports the server's status when the server ends the RPC mid-upload."""
    sent = 0

    def endless() -> Iterator[Any]:
        nonlocal sent
        if declared is not None:
            yield pb.EncodeRequest(options=pb.EncodeOptions(size_bytes=declared))
        while sent < 1 << 30:
            sent += 65536
            yield pb.EncodeRequest(chunk=bytes(65536))

    with grpc.insecure_channel(server.grpc_target) as channel, \
            pytest.raises(grpc.RpcError) as exc:
        for _ in pb_grpc.IVVAEStub(channel).Encode(endless(), metadata=AUTH):
            pass
    assert exc.value.code() == status  # type: ignore[attr-defined]
    assert dict(exc.value.trailing_metadata())[ERROR_CODE_KEY] == code  # type: ignore[attr-defined]
    assert sent < 16 << 20


DECODE: dict[str, tuple[Callable[[], AsyncIterator[Any]], grpc.StatusCode, str]] = {
    "garbage": (lambda: decode_requests(b"not a latent file" * 10), INVALID, "invalid_latent"),
    "no bytes": (lambda: _messages(pb.DecodeRequest(options=pb.DecodeOptions())), INVALID,
                 "empty_input"),
    "bad crf": (lambda: decode_requests(b"x", crf=99), INVALID, "invalid_input"),
    "bad format": (lambda: decode_requests(b"x", format=7), INVALID, "invalid_input"),
    "bad frames dtype": (lambda: decode_requests(b"x", format=pb.DECODE_FORMAT_FRAMES,
                                                 frames_dtype="float64"),
                         INVALID, "invalid_input"),
    "float mp4": (lambda: decode_requests(b"x", frames_dtype="float32"), INVALID,
                  "invalid_input"),
    "declared oversized": (lambda: decode_requests(b"\0" * 300_000, size_bytes=300_000),
                           EXHAUSTED, "too_large"),
    "fps 1e-4": (lambda: decode_requests(dumps({"latent": np.zeros((1, 4, 2, 2, 2),
                                                                   np.float32)}, {}),
                                         fps="0.0001"), INVALID, "invalid_input"),
    "empty batch": (lambda: decode_requests(dumps({"latent": np.zeros((0, 4, 1, 2, 2),
                                                                      np.float32)}, {})),
                    INVALID, "invalid_latent"),
}


@pytest.mark.parametrize("case", sorted(DECODE))
async def test_bad_decode_streams(server: ServerThread, case: str) -> None:
    make, status, code = DECODE[case]
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        got = await _status(pb_grpc.IVVAEStub(channel).Decode, make())
    assert got == (status, code)


async def test_unary_limits(server: ServerThread) -> None:
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.IVVAEStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as over_upload:
            await stub.EncodeUnary(pb.EncodeUnaryRequest(video=bytes(300_000)), metadata=AUTH)
        with pytest.raises(grpc.aio.AioRpcError) as over_message:  # grpc_max_message_bytes
            await stub.EncodeUnary(pb.EncodeUnaryRequest(video=bytes(3 << 20)), metadata=AUTH)
        with pytest.raises(grpc.aio.AioRpcError) as empty:
            await stub.EncodeUnary(pb.EncodeUnaryRequest(), metadata=AUTH)
    assert over_upload.value.code() == EXHAUSTED
    assert dict(over_upload.value.trailing_metadata())[ERROR_CODE_KEY] == "too_large"
    assert over_message.value.code() == EXHAUSTED
    assert empty.value.code() == INVALID


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),),
                                      (("authorization", KEY),)], ids=["none", "wrong", "bare"])
async def test_api_key_required(server: ServerThread, metadata: Any) -> None:
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.IVVAEStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as models:
            await stub.ListModels(pb.ListModelsRequest(), metadata=metadata)
        got = await _status(stub.Encode, encode_requests(GOOD), metadata)
        # probes need no key
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""))
    assert models.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert dict(models.value.trailing_metadata())[ERROR_CODE_KEY] == "unauthorized"
    assert got == (grpc.StatusCode.UNAUTHENTICATED, "unauthorized")
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_rpc_cap_answers_unavailable(server: ServerThread) -> None:
    """grpc_max_concurrent_rpcs=1: while one stream is open, the next RPC is UNAVAILABLE
    (code 'overloaded', which clients retry); afterwards RPCs work again."""
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.IVVAEStub(channel)
        first = stub.Encode(metadata=AUTH)
        await first.write(pb.EncodeRequest(options=pb.EncodeOptions()))
        await first.initial_metadata()  # the first RPC is in its handler, reading
        with pytest.raises(grpc.aio.AioRpcError) as second:
            await stub.ListModels(pb.ListModelsRequest(), metadata=AUTH)
        await first.write(pb.EncodeRequest(chunk=GOOD))
        await first.done_writing()
        assert [r.WhichOneof("part") async for r in first][-1] == "chunk"
        await stub.ListModels(pb.ListModelsRequest(), metadata=AUTH)
    assert second.value.code() == grpc.StatusCode.UNAVAILABLE
    assert dict(second.value.trailing_metadata())[ERROR_CODE_KEY] == "overloaded"


async def test_client_gets_too_large_before_uploading(server: ServerThread) -> None:
    """ivvae.client declares the size and waits for the server's go-ahead: a file over the
    limit is refused before its upload starts, as TooLarge (not INTERNAL)."""
    async with AsyncClient(server.grpc_url, api_key=KEY) as client:
        for _ in range(3):
            with pytest.raises(TooLarge):
                await client.encode(bytes(8 << 20))
        with pytest.raises(TooLarge):
            await client.decode(bytes(8 << 20))


async def test_encode_unary_reads_frames_and_checks_its_declared_size(
        server: ServerThread) -> None:
    frames = np.zeros((5, 16, 16, 3), np.uint8)
    spec = pb.TensorSpec(shape=[5, 16, 16, 3], dtype="uint8", fps="12")
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.IVVAEStub(channel)
        # Frames as a raw tensor were once parsed as a file ("not a supported video").
        reply = await stub.EncodeUnary(pb.EncodeUnaryRequest(
            options=pb.EncodeOptions(frames=spec), video=frames.tobytes()), metadata=AUTH)
        with pytest.raises(grpc.aio.AioRpcError) as wrong_size:
            await stub.EncodeUnary(pb.EncodeUnaryRequest(
                options=pb.EncodeOptions(size_bytes=len(GOOD) + 1), video=GOOD),
                metadata=AUTH)
        latent = dumps({"latent": np.zeros((1, 4, 2, 2, 2), np.float32)}, {})
        tensor_fps = await _status(stub.Decode, decode_requests(
            latent[-128:], tensor=pb.TensorSpec(shape=[1, 4, 2, 2, 2], dtype="float32",
                                                fps="12")))
    assert (reply.info.num_frames, reply.info.width) == (5, 16)
    assert (reply.info.fps_numerator, reply.info.fps_denominator) == (12, 1)
    assert wrong_size.value.code() == INVALID
    assert "size_bytes" in (wrong_size.value.details() or "")
    assert tensor_fps == (INVALID, "invalid_input")


@pytest.mark.parametrize("method", ["Encode", "Decode", "EncodeUnary"])
async def test_a_message_that_does_not_parse_is_invalid_argument(server: ServerThread,
                                                                 method: str) -> None:
    # Bytes that are no protobuf message of the method: the deserializer's error was
    # INTERNAL (streams) or UNKNOWN (unary) with no error code.
    path = f"/ivvae.v1.IVVAE/{method}"
    garbage = b"\xff\xff\xff\xff"
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        if method == "EncodeUnary":
            call: Any = channel.unary_unary(path, request_serializer=None,
                                            response_deserializer=None)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call(garbage, metadata=AUTH)
            exc = raised.value
            got = exc.code(), dict(exc.trailing_metadata() or ()).get(ERROR_CODE_KEY)
        else:
            stream = channel.stream_stream(path, request_serializer=None,
                                           response_deserializer=None)
            got = await _status(stream, _messages(garbage))
    assert got == (INVALID, "invalid_input")
    await _good_encode_works(server.grpc_target)


async def test_uploads_count_against_the_memory_for_bodies(server: ServerThread) -> None:
    """An upload that would pass the share of memory for request bodies while others hold
    theirs is UNAVAILABLE (retry), one that could never fit RESOURCE_EXHAUSTED; nothing
    stays held after the RPC."""
    bodies = server.service.pipeline.bodies
    capacity = bodies.capacity
    bodies.capacity = len(GOOD) + 1000
    try:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            stub = pb_grpc.IVVAEStub(channel)
            with bodies.hold() as other:
                other.take(2000)  # another request's body, still arriving
                assert await _status(stub.Encode, encode_requests(GOOD)) == (
                    grpc.StatusCode.UNAVAILABLE, "overloaded")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.EncodeUnary(pb.EncodeUnaryRequest(video=GOOD), metadata=AUTH)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert bodies.held == 0
            await _good_encode_works(server.grpc_target)
            assert await _status(stub.Encode, encode_requests(GOOD + bytes(2000))) == (
                EXHAUSTED, "too_large")
            assert bodies.held == 0
    finally:
        bodies.capacity = capacity
