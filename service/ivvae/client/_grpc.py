"""The gRPC transport of the clients (``grpc.aio``): the ``ivvae.v1.IVVAE`` streaming RPCs.

Inputs go up in 1 MiB chunks and outputs come down in chunks of at most 1 MiB, so the
channel keeps gRPC's default 4 MB message limit whatever the sizes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..api.grpc.errors import ERROR_CODE_KEY
from ..api.grpc.gen import ivvae_pb2 as pb
from ..api.grpc.gen import ivvae_pb2_grpc as pb_grpc
from ..core.model_info import ModelInfo
from ..errors import BackendUnavailable, DeadlineExceeded, InvalidInput, IVVAEError
from ._common import (
    HEALTH_TIMEOUT_S,
    VideoSource,
    error_from_code,
    frames_from_file,
    iter_source,
    tls_refused,
)
from ._result import LatentResult, Models


def _error(status: grpc.StatusCode, details: str | None, trailing: Any,
           target: str) -> IVVAEError:
    code = next((v for k, v in trailing or () if k == ERROR_CODE_KEY), None)
    if code is not None:
        return error_from_code(str(code), details or "")
    detail = f"{status.name} from {target}: {details}"
    if status == grpc.StatusCode.UNAVAILABLE and "CERTIFICATE_VERIFY_FAILED" in (details or ""):
        return tls_refused(target, "CERTIFICATE_VERIFY_FAILED")
    if status == grpc.StatusCode.UNAVAILABLE:
        return BackendUnavailable(detail)
    if status == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(detail)
    err = IVVAEError(detail)
    err.code = status.name.lower()
    return err


def _rpc_error(exc: grpc.aio.AioRpcError, target: str) -> IVVAEError:
    return _error(exc.code(), exc.details(), exc.trailing_metadata(), target)


def _size(source: VideoSource | Path) -> int:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(source)
    return os.stat(source).st_size


class GrpcTransport:
    def __init__(self, target: str, *, api_key: str | None, timeout: float,
                 secure: bool = False, ca_cert: str | os.PathLike[str] | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        if secure:  # grpcs://: the system's roots, or the given CA bundle (PEM)
            roots = Path(ca_cert).read_bytes() if ca_cert else None
            creds = grpc.ssl_channel_credentials(root_certificates=roots)
            self._channel = grpc.aio.secure_channel(target, creds)
        else:
            self._channel = grpc.aio.insecure_channel(target)
        self._stub = pb_grpc.IVVAEStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def _stream(self, method: Any, first: Any, chunk: Callable[[bytes], Any],
                      source: VideoSource | Path) -> list[Any]:
        """Send ``first`` (the options), wait for the server's headers (its go-ahead, see
        the .proto), upload ``source`` in chunks, and return every response."""
        call = method(metadata=self._metadata, timeout=self.timeout)
        try:
            await call.write(first)
            await call.initial_metadata()
            if not call.done():  # not refused: upload
                async for piece in iter_source(source):
                    await call.write(chunk(piece))
                await call.done_writing()
            return [response async for response in call]
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc, self.target) from exc
        except asyncio.InvalidStateError as exc:  # a write after the server ended the RPC
            raise _error(await call.code(), await call.details(),
                         await call.trailing_metadata(), self.target) from exc
        finally:
            if not call.done():
                call.cancel()

    async def encode(self, video: VideoSource | Path | np.ndarray, options: dict[str, Any],
                     preprocess: dict[str, str], fps: float | None = None) -> LatentResult:
        fields: dict[str, Any] = {}
        for name, value in preprocess.items():
            if name == "bucket":
                fields[name] = value.split(",")
            elif name in ("start_frame", "num_frames", "max_frames", "stride"):
                fields[name] = _integer(name, value)
            else:
                fields[name] = value
        source: VideoSource | Path
        if isinstance(video, np.ndarray):
            fields["frames"] = pb.TensorSpec(shape=list(video.shape), dtype="uint8",
                                             fps="" if fps is None else repr(float(fps)))
            source = video.tobytes()
        else:
            source = video
        responses = await self._stream(
            self._stub.Encode,
            pb.EncodeRequest(options=_options(pb.EncodeOptions, **options, **fields,
                                              size_bytes=_size(source))),
            lambda piece: pb.EncodeRequest(chunk=piece), source)
        results = [r.result for r in responses if r.WhichOneof("part") == "result"]
        data = b"".join(r.chunk for r in responses if r.WhichOneof("part") == "chunk")
        if len(results) != 1 or len(data) != results[0].size_bytes:
            raise IVVAEError(f"{self.target} ended the Encode stream early")
        return LatentResult.from_bytes(data, cache_hit=results[0].cache_hit)

    async def decode(self, latent: bytes, *, frames: bool, crf: int,
                     target: dict[str, str] | None = None,
                     frames_dtype: str = "uint8") -> bytes | np.ndarray:
        fmt = pb.DECODE_FORMAT_FRAMES if frames else pb.DECODE_FORMAT_MP4
        fields: dict[str, Any] = {
            k: _integer(k, v) if k in ("num_frames", "height", "width") else v
            for k, v in (target or {}).items()}
        responses = await self._stream(
            self._stub.Decode,
            pb.DecodeRequest(options=_options(
                pb.DecodeOptions, format=fmt, crf=crf, size_bytes=len(latent),
                frames_dtype="" if frames_dtype == "uint8" else frames_dtype, **fields)),
            lambda piece: pb.DecodeRequest(chunk=piece), latent)
        if not responses or responses[0].WhichOneof("part") != "info":
            raise IVVAEError(f"{self.target} ended the Decode stream early")
        data = b"".join(r.chunk for r in responses[1:])
        if not frames:
            return data
        return frames_from_file(data, self.target)

    async def models(self) -> Models:
        try:
            reply = await self._stub.ListModels(pb.ListModelsRequest(), metadata=self._metadata,
                                                timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc, self.target) from exc
        fields = [f.name for f in dataclasses.fields(ModelInfo)]
        return Models(default=reply.default_model, encode_precision=reply.encode_precision,
                      models=[ModelInfo.from_dict({f: getattr(m, f) for f in fields})
                              for m in reply.models])

    async def healthy(self) -> bool:
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=""),
                                             timeout=min(self.timeout, HEALTH_TIMEOUT_S))
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def answers(self) -> bool:
        try:
            await self._health.Check(health_pb2.HealthCheckRequest(service=""),
                                     timeout=min(self.timeout, HEALTH_TIMEOUT_S))
        except grpc.aio.AioRpcError as exc:
            # NOT_SERVING and refusals are answers; no connection or no reply are not.
            return exc.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                      grpc.StatusCode.UNAVAILABLE)
        return True

    async def close(self) -> None:
        await self._channel.close()


def _integer(name: str, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"parameter {name!r} must be an integer, got {value!r}") from None


def _options(message: Callable[..., Any], **fields: Any) -> Any:
    """``message(**fields)``, or the error the HTTP API gives for a value a protobuf field
    cannot hold (a negative or huge count, a text for a number), naming the parameter."""
    try:
        return message(**fields)
    except (TypeError, ValueError):
        for name, value in fields.items():
            try:
                message(**{name: value})
            except (TypeError, ValueError) as exc:
                raise InvalidInput(f"parameter {name!r} cannot be {value!r} ({exc})") from None
        raise
