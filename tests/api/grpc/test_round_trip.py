"""gRPC Encode/Decode give the HTTP API's bytes for the same input, in small messages."""

from __future__ import annotations

import struct
from fractions import Fraction

import grpc
import httpx
import numpy as np
import pytest

from ivvae.api.grpc import server as grpc_server_module
from ivvae.api.grpc.gen import ivvae_pb2 as pb
from ivvae.api.grpc.gen import ivvae_pb2_grpc as pb_grpc
from ivvae.latents import decode_latent_file
from ivvae.safetensors_io import loads
from ivvae.video import encode_mp4_bytes, open_video
from tests import media
from tests.api.grpc.conftest import grpc_decode, grpc_encode
from tests.grpc_fixtures import ServerThread

VIDEO = media.make_video(None, frames=6, width=24, height=16)
DEFAULT_CLIENT_LIMIT = 4 * 1024 * 1024

OPTIONS = {
    "mean": ({}, {}),
    "sample-bf16-moments": ({"sample": True, "seed": 7, "dtype": "bfloat16", "moments": True},
                            {"sample": "true", "seed": "7", "dtype": "bfloat16",
                             "moments": "true"}),
}


@pytest.mark.parametrize("case", sorted(OPTIONS))
async def test_encode_equals_http(server: ServerThread, case: str) -> None:
    grpc_options, query = OPTIONS[case]
    responses, latent = await grpc_encode(server.grpc_target, VIDEO, **grpc_options)
    async with httpx.AsyncClient(base_url=server.http_url, timeout=120) as http:
        expected = await http.post("/encode", params=query, content=VIDEO,
                                   headers={"content-type": "video/mp4"})
    assert expected.status_code == 200, expected.text
    assert latent == expected.content

    kinds = [r.WhichOneof("part") for r in responses]
    result_at = kinds.index("result")
    assert set(kinds[:result_at]) <= {"progress"} and set(kinds[result_at + 1 :]) == {"chunk"}
    result = responses[result_at].result
    _, info = decode_latent_file(latent)
    assert result.size_bytes == len(latent)
    assert dict(result.info.metadata) == info.to_metadata()
    assert (result.info.model, result.info.num_frames, result.info.width,
            result.info.height) == (info.model_name, 6, 24, 16)
    assert Fraction(result.info.fps_numerator, result.info.fps_denominator) == info.fps
    assert tuple(result.info.latent_shape) == info.latent_shape


async def test_encode_unary_equals_stream(server: ServerThread) -> None:
    _, streamed = await grpc_encode(server.grpc_target, VIDEO)
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        reply = await pb_grpc.IVVAEStub(channel).EncodeUnary(
            pb.EncodeUnaryRequest(options=pb.EncodeOptions(), video=VIDEO))
    assert reply.latent == streamed
    assert reply.cache_hit  # the stream above filled the cache
    assert reply.info.num_frames == 6


async def test_decode_equals_http_byte_for_byte(server: ServerThread) -> None:
    """gRPC and HTTP return the same files for the same latent: the frames file and the MP4
    (both come from ``ivvae.outputs``)."""
    _, latent = await grpc_encode(server.grpc_target, VIDEO)
    info, chunks = await grpc_decode(server.grpc_target, latent,
                                     format=pb.DECODE_FORMAT_FRAMES)
    async with httpx.AsyncClient(base_url=server.http_url, timeout=120) as http:
        frames_http = await http.post("/decode", params={"format": "frames"}, content=latent,
                                      headers={"content-type": "application/octet-stream"})
        mp4_http = await http.post("/decode", content=latent,
                                   headers={"content-type": "application/octet-stream"})
    assert frames_http.status_code == 200 == mp4_http.status_code, frames_http.text
    assert b"".join(chunks) == frames_http.content
    tensors, meta = loads(frames_http.content)
    frames = np.asarray(tensors["frames"].array)
    assert frames.shape == (6, 16, 24, 3)
    assert meta["layout"] == "THWC uint8 RGB" and meta["fps"] == "24/1"
    assert (info.num_frames, info.width, info.height) == (6, 24, 16)

    # MP4 (the default): the same bytes over both, holding exactly the H.264 frames that
    # the writer makes of those frames.
    mp4_info, mp4_chunks = await grpc_decode(server.grpc_target, latent)
    assert mp4_info == info
    assert b"".join(mp4_chunks) == mp4_http.content
    reference = encode_mp4_bytes(frames, 24, crf=18)
    with open_video(b"".join(mp4_chunks)) as reader, open_video(reference) as ref:
        decoded = reader.read_all()
        assert reader.info.fps == ref.info.fps == 24
        np.testing.assert_array_equal(decoded, ref.read_all())
    assert decoded.shape == frames.shape


async def test_large_video_streams_with_default_client_limits(server: ServerThread) -> None:
    """A > 4 MB upload (a clip plus a 5 MB 'free' box, which demuxers skip) goes up in
    chunks over a channel with gRPC's default limits, and comes back equal to HTTP's."""
    pad = 5 * 1024 * 1024
    big = VIDEO + struct.pack(">I4s", pad + 8, b"free") + bytes(pad)
    assert len(big) > DEFAULT_CLIENT_LIMIT
    _, latent = await grpc_encode(server.grpc_target, big)
    async with httpx.AsyncClient(base_url=server.http_url, timeout=120) as http:
        expected = await http.post("/encode", content=big, headers={"content-type": "video/mp4"})
    assert latent == expected.content
    assert decode_latent_file(latent)[1].num_frames == 6


async def test_outputs_are_chunked(server: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every response carries at most CHUNK_BYTES (shrunk here, so small outputs need many
    chunks): outputs of any size fit the client's default 4 MB message limit."""
    monkeypatch.setattr(grpc_server_module, "CHUNK_BYTES", 256)
    responses, latent = await grpc_encode(server.grpc_target, VIDEO, moments=True)
    chunks = [r.chunk for r in responses if r.WhichOneof("part") == "chunk"]
    assert len(chunks) > 1 and max(map(len, chunks)) <= 256
    _, frame_chunks = await grpc_decode(server.grpc_target, latent,
                                        format=pb.DECODE_FORMAT_FRAMES)
    assert len(frame_chunks) > 1 and max(map(len, frame_chunks)) <= 256
    tensors, _ = loads(b"".join(frame_chunks))
    assert tensors["frames"].shape == (6, 16, 24, 3)


async def test_list_models(server: ServerThread) -> None:
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        reply = await pb_grpc.IVVAEStub(channel).ListModels(pb.ListModelsRequest())
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        expected = (await http.get("/models")).json()
    assert reply.default_model == expected["default"]
    assert reply.encode_precision == expected["encode_precision"] == "float32"
    assert [m.name for m in reply.models] == [m["name"] for m in expected["models"]]
    assert reply.models[0].weights_sha256 == expected["models"][0]["weights_sha256"]
