from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from ivvae.api.grpc.gen import ivvae_pb2 as pb
from ivvae.api.grpc.gen import ivvae_pb2_grpc as pb_grpc
from tests.grpc_fixtures import ServerThread, server_thread
from tests.service_fixtures import tiny_settings, tiny_weights  # noqa: F401


@pytest.fixture(scope="module")
def server(tiny_weights: Path) -> Iterator[ServerThread]:  # noqa: F811
    """One server (gRPC and HTTP over the same Service) for a test module."""
    with server_thread(tiny_settings(tiny_weights), http=True) as srv:
        yield srv


async def encode_requests(data: bytes, chunk: int = 1 << 20,
                          **options: Any) -> AsyncIterator[pb.EncodeRequest]:
    yield pb.EncodeRequest(options=pb.EncodeOptions(**options))
    for i in range(0, len(data), chunk):
        yield pb.EncodeRequest(chunk=data[i : i + chunk])


async def decode_requests(data: bytes, chunk: int = 1 << 20,
                          **options: Any) -> AsyncIterator[pb.DecodeRequest]:
    yield pb.DecodeRequest(options=pb.DecodeOptions(**options))
    for i in range(0, len(data), chunk):
        yield pb.DecodeRequest(chunk=data[i : i + chunk])


async def grpc_encode(target: str, data: bytes, metadata: tuple[tuple[str, str], ...] = (),
                      **options: Any) -> tuple[list[Any], bytes]:
    """(all responses, the latent file) of one Encode stream, on a default channel."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.IVVAEStub(channel)
        responses = [r async for r in stub.Encode(encode_requests(data, **options),
                                                  metadata=metadata)]
    return responses, b"".join(r.chunk for r in responses if r.WhichOneof("part") == "chunk")


async def grpc_decode(target: str, data: bytes, **options: Any) -> tuple[Any, list[bytes]]:
    """(the info message, the payload chunks) of one Decode stream, on a default channel."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.IVVAEStub(channel)
        responses = [r async for r in stub.Decode(decode_requests(data, **options))]
    assert responses[0].WhichOneof("part") == "info"
    assert all(r.WhichOneof("part") == "chunk" for r in responses[1:])
    return responses[0].info, [r.chunk for r in responses[1:]]
