"""The gRPC API: ``ivvae.v1.IVVAE`` on ``grpc.aio``, with health checking and reflection.

A transport only: it reads the request stream (bounded by ``max_upload_bytes``), calls the
same ``Pipeline`` as HTTP, and writes the answer in chunks of at most ``CHUNK_BYTES``, so
clients with gRPC's default 4 MB receive limit get outputs of any size. Errors get their
status from one table (``errors.STATUS``) and their stable code in the trailing metadata
``ivvae-error-code``.

Handlers are coroutines that ``context.write`` their responses (not async generators): when
a client cancels or its deadline passes, grpc cancels the handler task, the cancellation
reaches the pipeline at once, and the pipeline's ``finally`` blocks close the backend
sessions (``ivvae_active_sessions`` goes back down).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ...config import Settings
from ...core import strict
from ...core.names import CRF_RANGE, DEFAULT_CRF
from ...core.steps import FramesDtype
from ...core.tasks import aclose_all, finish, in_time, within
from ...errors import (
    DeadlineExceeded,
    EmptyInput,
    InvalidInput,
    IVVAEError,
    NotTakenInTime,
    TooLarge,
)
from ...latents import LatentInfo
from ...memory import BodyHold
from ...outputs import OutputFormat, frames_dtype_for, render, render_batch
from ...pipeline import EncodeOptions, FramesUpload
from ...service import Service
from ...video import DEFAULT_FPS, Preprocess
from ...wire import (
    LATENT_DTYPES,
    DecodeTarget,
    check_latent_values,
    is_ivvae_latent_file,
    parse_shape,
    parse_wire_dtype,
    read_bare_latent,
    read_raw_tensor,
    tensor_to_float32,
)
from ..metering import RequestMeter
from .errors import ERROR_CODE_KEY, grpc_status
from .gen import ivvae_pb2 as pb
from .gen import ivvae_pb2_grpc as pb_grpc
from .guard import Guard, Malformed

log = logging.getLogger("ivvae.grpc")

CHUNK_BYTES = 1 << 20  # every response message carries at most this many bytes of payload
HEALTH_POLL_S = 1.0
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["IVVAE"].full_name  # "ivvae.v1.IVVAE"

# The op (ivvae_requests_total's label) of each RPC of SERVICE_NAME, as its handler meters
# it; the guard counts its refusals by it (any other method: "other").
RPC_OPS: dict[str, str] = {f"/{SERVICE_NAME}/{name}": op for name, op in (
    ("Encode", "encode"), ("EncodeUnary", "encode"), ("Decode", "decode"),
    ("ListModels", "models"))}

Context = Any  # grpc.aio.ServicerContext; grpcio ships no type hints


def latent_info_message(info: LatentInfo) -> pb.LatentInfo:
    return pb.LatentInfo(
        model=info.model_name, num_frames=info.num_frames, width=info.width,
        height=info.height, fps_numerator=info.fps.numerator,
        fps_denominator=info.fps.denominator, latent_shape=list(info.latent_shape),
        dtype=info.dtype, content_sha256=info.content_sha256, metadata=info.to_metadata(),
    )


def _chunks(data: bytes | bytearray | memoryview) -> list[bytes]:
    """``data`` (any C-contiguous buffer) in pieces of at most ``CHUNK_BYTES`` bytes."""
    view = memoryview(data).cast("B")
    return [bytes(view[i : i + CHUNK_BYTES]) for i in range(0, len(view), CHUNK_BYTES)]


def _preprocess(msg: pb.EncodeOptions) -> Preprocess:
    """The preprocessing fields, parsed as HTTP's query parameters of the same names."""
    params = [(name, getattr(msg, name)) for name in ("resize", "crop", "start_s", "fps")
              if getattr(msg, name)]
    params += [("bucket", b) for b in msg.bucket]
    params += [(name, str(getattr(msg, name)))
               for name in ("start_frame", "num_frames", "max_frames", "stride")
               if msg.HasField(name)]
    return Preprocess.parse(params)


def _encode_options(msg: pb.EncodeOptions | None) -> EncodeOptions:
    if msg is None:
        return EncodeOptions()
    if msg.HasField("frames"):
        _frames_spec(msg.frames)
    return EncodeOptions(model=msg.model, sample=msg.sample,
                         seed=msg.seed if msg.HasField("seed") else None,
                         dtype=msg.dtype or "float32", include_moments=msg.moments,
                         preprocess=_preprocess(msg))


def _frames_spec(spec: pb.TensorSpec) -> tuple[tuple[int, ...], float]:
    """(shape, fps) of frames sent as a raw tensor: (T, H, W, 3) uint8."""
    shape = parse_shape([",".join(str(d) for d in spec.shape)])
    if parse_wire_dtype(spec.dtype or "uint8", allowed=("uint8",)) != "uint8" or len(
            shape) != 4 or shape[3] != 3:
        raise InvalidInput(f"frames are (T, H, W, 3) uint8; got shape {list(shape)}")
    try:
        rate = strict.number(spec.fps) if spec.fps else Fraction(DEFAULT_FPS)
    except ValueError as exc:
        raise InvalidInput(f"frames fps: {exc}") from None
    if not strict.fps_in_range(rate):
        raise InvalidInput(f"frames fps must be in {strict.FPS_RANGE}")
    fps = float(rate)
    return shape, fps


def _encode_source(msg: pb.EncodeOptions | None, data: bytes) -> bytes | FramesUpload:
    if msg is None or not msg.HasField("frames"):
        return data
    shape, fps = _frames_spec(msg.frames)
    return FramesUpload(np.ascontiguousarray(read_raw_tensor(data, shape, "uint8").array),
                        fps=fps)


def _decode_target(msg: pb.DecodeOptions | None) -> list[tuple[str, str]]:
    """The bare-latent parameters that were given, as HTTP's (name, value) pairs."""
    if msg is None:
        return []
    params = [(name, getattr(msg, name)) for name in ("model", "fps", "latent_space")
              if getattr(msg, name)]
    return params + [(name, str(getattr(msg, name))) for name in ("num_frames", "height",
                                                                  "width")
                     if msg.HasField(name)]


_FORMATS: dict[int, OutputFormat] = {pb.DECODE_FORMAT_UNSPECIFIED: "mp4",
                                      pb.DECODE_FORMAT_MP4: "mp4",
                                      pb.DECODE_FORMAT_FRAMES: "frames"}


def _decode_options(msg: pb.DecodeOptions | None
                    ) -> tuple[OutputFormat, int, FramesDtype]:
    """(output format, crf, frames dtype)."""
    if msg is None:
        return "mp4", DEFAULT_CRF, "uint8"
    if msg.format not in _FORMATS:
        raise InvalidInput(f"unknown decode format {msg.format}")
    DecodeTarget.parse(_decode_target(msg))  # refused before the upload
    crf = msg.crf if msg.HasField("crf") else DEFAULT_CRF
    if not CRF_RANGE[0] <= crf <= CRF_RANGE[1]:
        raise InvalidInput(f"crf must be in [{CRF_RANGE[0]}, {CRF_RANGE[1]}], got {crf}")
    fmt = _FORMATS[msg.format]
    return fmt, crf, frames_dtype_for(fmt, msg.frames_dtype)


async def _deadlined(stream: AsyncIterator[Any], seconds: float) -> AsyncIterator[Any]:
    """``stream``, failing with DeadlineExceeded (as HTTP's 408 for a body gap) when the
    next message takes over ``seconds`` (a stream that sends its options and then nothing
    must not hold its RPC slot)."""
    while True:
        try:
            item = await within(anext(stream, _END), seconds)
        except TimeoutError:
            raise DeadlineExceeded(f"no request message for {seconds:g} s: the stream was "
                                   "dropped") from None
        if item is _END:
            return
        if isinstance(item, Malformed):
            raise item.error()
        yield item


_END = object()


async def _prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    if first is not None:
        yield first
    async for item in rest:
        yield item


async def _stop(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` (if still running) and wait until it has finished."""
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled():
        task.exception()  # seen: the caller has dealt with the outcome already


@dataclass
class _Rpc:
    # The upload's bytes held in memory; let go once a decode has started or an encode is
    # done, not after the answer's last write, which a slow reader can hold for the whole
    # request timeout.
    body: BodyHold
    admitted: bool = False  # counted in ivvae_in_flight_requests


class IVVAEServicer(pb_grpc.IVVAEServicer):
    """``ivvae.v1.IVVAE`` over one ``Service``."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings = service.settings

    # -- plumbing -----------------------------------------------------------------------------

    def _admit(self, context: Context, rpc: _Rpc) -> None:
        """Count the RPC in flight. The key and the cap were checked by ``Guard`` before
        any message was read."""
        self.service.metrics.in_flight.inc()
        rpc.admitted = True

    @contextlib.asynccontextmanager
    async def _call(self, context: Context, op: str, *, admit: bool = True
                    ) -> AsyncIterator[_Rpc]:
        """One RPC: admission (unless the handler admits it later), metrics, and errors
        mapped to statuses."""
        m = self.service.metrics
        with self.service.pipeline.bodies.hold() as body:
            rpc = _Rpc(body)
            meter = RequestMeter(m, op, "grpc", in_flight=False)
            meter.start()
            failure: BaseException | None = None
            try:
                if admit:
                    self._admit(context, rpc)
                yield rpc
            except NotTakenInTime as exc:
                # A status would wait behind the write the client is not taking, for as long
                # as it stays connected. A handler that ends cancelled sends none, and what
                # the RPC holds here goes now; gRPC keeps the stream and its one pending
                # message until the client reads or goes.
                failure = exc
                m.errors.labels(exc.code).inc()
                log.info("gRPC %s: %s; resetting the stream", op, exc.detail)
                raise asyncio.CancelledError(exc.detail) from exc
            except IVVAEError as exc:
                failure = exc
                status = grpc_status(exc)
                m.errors.labels(exc.code).inc()
                (log.warning if status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
                 else log.info)("gRPC %s -> %s %s: %s", op, status.name, exc.code, exc.detail)
                await context.abort(status, exc.detail,
                                    trailing_metadata=((ERROR_CODE_KEY, exc.code),))
            except asyncio.CancelledError as exc:
                failure = exc
                raise
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                failure = exc
                log.exception("unhandled error in gRPC %s", op)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error",
                                    trailing_metadata=((ERROR_CODE_KEY, IVVAEError.code),))
            finally:
                if rpc.admitted:
                    m.in_flight.dec()
                meter.finish(failure)

    async def _receive(self, context: Context, rpc: _Rpc, requests: AsyncIterator[Any],
                       what: str, check: Callable[[Any], object]) -> tuple[Any, bytes]:
        """Admit the RPC and read its request stream: ``options`` first (optional), then
        ``chunk``s. Returns (options or None, the file's bytes).

        The key and the RPC cap were checked before (``Guard``). Every message, the first
        included, must come within ``grpc_read_timeout_s``. ``check(options)`` validates
        the options (raising); then the response headers go out (clients may wait for them
        before uploading: see the .proto). Reading stops at once when ``max_upload_bytes``
        is passed.
        """
        limit = self.settings.max_upload_bytes
        stream = _deadlined(aiter(requests), self.settings.grpc_read_timeout_s)
        first: Any = await anext(stream, None)
        self._admit(context, rpc)
        has_options = first is not None and first.WhichOneof("part") == "options"
        options: Any = first.options if has_options else None
        declared = options.size_bytes if has_options and options.HasField("size_bytes") else None
        if declared is not None and declared > limit:
            raise TooLarge(f"the {what} is {declared} bytes; the limit is {limit}")
        check(options)
        await context.send_initial_metadata(())
        parts: list[bytes] = []
        total = 0
        rate, grace = self.settings.min_upload_rate, self.settings.grpc_read_timeout_s
        start = asyncio.get_running_loop().time()
        async for request in _prepend(None if has_options else first, stream):
            kind = request.WhichOneof("part")
            if kind == "chunk":
                total += len(request.chunk)
                if total > limit:
                    raise TooLarge(f"the {what} exceeds the limit of {limit} bytes")
                if declared is not None and total > declared:  # no need to read the rest
                    raise InvalidInput(f"the stream carries more than the {declared} bytes "
                                       f"its options declared for the {what}")
                rpc.body.take(len(request.chunk))
                # Each gap is bounded by the read timeout; this bounds their sum.
                late = asyncio.get_running_loop().time() - start - grace
                if rate and late > total / rate:
                    raise DeadlineExceeded(
                        f"the {what} came too slowly: {total} bytes in {late + grace:.0f} s, "
                        f"under the minimum of {rate:g} bytes a second")
                parts.append(request.chunk)
            elif kind == "options":
                raise InvalidInput("options must be the first message of the stream, and "
                                   "come once")
            else:
                raise InvalidInput("a request message carries neither options nor a chunk")
        if not total:
            raise EmptyInput(f"the stream carried no bytes: send the {what} in chunk messages")
        if declared is not None and declared != total:
            raise InvalidInput(f"the stream carried {total} bytes of the {what}, but its "
                               f"options declared {declared}")
        return options, b"".join(parts)

    # -- the RPCs -----------------------------------------------------------------------------

    async def Encode(self, request_iterator: AsyncIterator[Any], context: Context) -> None:
        async with self._call(context, "encode", admit=False) as rpc:
            options, data = await self._receive(context, rpc, request_iterator, "video",
                                                _encode_options)
            opts = _encode_options(options)
            # The client must take the answer (progress, then the latent) within the
            # request timeout: a write it does not take would otherwise wait for ever.
            write = in_time(context.write, self.settings.request_timeout_s)
            frames_done = 0
            moved = asyncio.Event()

            def on_frames(n: int) -> None:
                nonlocal frames_done
                frames_done += n
                moved.set()

            source = _encode_source(options, data)
            del data
            work = asyncio.ensure_future(
                self.service.pipeline.encode(source, opts, on_frames=on_frames))
            try:
                while not work.done():
                    tick = asyncio.ensure_future(moved.wait())
                    try:
                        await asyncio.wait((work, tick), return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        tick.cancel()
                    if moved.is_set() and not work.done():
                        moved.clear()
                        await write(pb.EncodeResponse(
                            progress=pb.EncodeProgress(frames_done=frames_done)))
                result = work.result()
                del source
                rpc.body.let_go()
            finally:
                await _stop(work)
            await write(pb.EncodeResponse(result=pb.EncodeResult(
                info=latent_info_message(result.info), cache_hit=result.cache_hit,
                size_bytes=len(result.data))))
            for chunk in _chunks(result.data):
                await write(pb.EncodeResponse(chunk=chunk))

    async def EncodeUnary(self, request: Any, context: Context) -> Any:
        async with self._call(context, "encode") as rpc:
            limit = self.settings.max_upload_bytes
            if len(request.video) > limit:
                raise TooLarge(f"the video is {len(request.video)} bytes; the limit is {limit}")
            if not request.video:
                raise EmptyInput("the request carries no video bytes")
            rpc.body.take(len(request.video))  # already in memory: a bound on how many are
            options = request.options if request.HasField("options") else None
            if options is not None and options.HasField("size_bytes") and (
                    options.size_bytes != len(request.video)):
                raise InvalidInput(f"options.size_bytes says {options.size_bytes} bytes; the "
                                   f"request carries {len(request.video)}")
            opts = _encode_options(options)
            result = await self.service.pipeline.encode(
                _encode_source(options, request.video), opts)
            return pb.EncodeUnaryResponse(info=latent_info_message(result.info),
                                          cache_hit=result.cache_hit, latent=result.data)
        raise AssertionError("unreachable: _call aborts the RPC on every error")

    async def Decode(self, request_iterator: AsyncIterator[Any], context: Context) -> None:
        async with self._call(context, "decode", admit=False) as rpc:
            options, data = await self._receive(context, rpc, request_iterator,
                                                "latent file", _decode_options)
            fmt, crf, frames_dtype = _decode_options(options)
            target = _decode_target(options)
            pipeline = self.service.pipeline
            bare: tuple[np.ndarray, str] | None = None
            if options is not None and options.HasField("tensor"):
                if options.tensor.fps:
                    raise InvalidInput("tensor.fps is the rate of frames sent to Encode; a "
                                       "decoded latent's rate is DecodeOptions.fps")
                shape = parse_shape([",".join(str(d) for d in options.tensor.shape)])
                dtype = parse_wire_dtype(options.tensor.dtype, allowed=LATENT_DTYPES)
                raw = read_raw_tensor(data, shape, dtype)
                bare = check_latent_values(tensor_to_float32(raw), dtype), dtype
            elif not is_ivvae_latent_file(data):
                bare = read_bare_latent(data)
            elif target:
                raise InvalidInput(f"option {target[0][0]!r} is for bare latents: a latent "
                                   "file from Encode records its own model, size and fps")
            if bare is None:
                info, frames = await pipeline.decode_frames(data, frames_dtype)
                items = [frames]
            else:
                info, items = await pipeline.decode_bare(*bare, DecodeTarget.parse(target),
                                                         frames_dtype)
            del data, bare
            rpc.body.let_go()
            message = latent_info_message(info)
            message.batch = len(items)
            # The client must take the answer within the request timeout, from when it is
            # ready (a batch's whole file) or begins (a stream: between decoder steps nothing
            # else waits on the clock).
            if len(items) > 1:
                body, _ = await render_batch(fmt, info, items, crf=crf,
                                             frames_dtype=frames_dtype)
                write = in_time(context.write, self.settings.request_timeout_s)
                await write(pb.DecodeResponse(info=message))
                for chunk in _chunks(body):
                    await write(pb.DecodeResponse(chunk=chunk))
                return
            output = render(fmt, info, items[0], crf=crf, frames_dtype=frames_dtype)
            write = in_time(context.write, self.settings.request_timeout_s)
            try:
                await write(pb.DecodeResponse(info=message))
                async for piece in output:
                    for chunk in _chunks(piece):
                        await write(pb.DecodeResponse(chunk=chunk))
            finally:
                await finish(aclose_all(output, items[0]))

    async def ListModels(self, request: Any, context: Context) -> Any:
        async with self._call(context, "models"):
            service = self.service
            return pb.ListModelsResponse(
                default_model=service.default_model,
                encode_precision=service.settings.encode_precision,
                models=[pb.ModelInfo(**m.as_dict()) for m in service.models.values()])
        raise AssertionError("unreachable: _call aborts the RPC on every error")


class GrpcServer:
    """A started gRPC server: ``port`` (the bound one, useful with port 0) and ``stop``."""

    def __init__(self, server: Any, health_servicer: Any, watcher: asyncio.Task[None],
                 port: int) -> None:
        self.server = server
        self.health = health_servicer
        self.port = port
        self._watcher = watcher

    async def stop(self, grace: float | None) -> None:
        """Report NOT_SERVING, refuse new RPCs, give running ones ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        await _stop(self._watcher)
        await self.server.stop(grace)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def _watch_readiness(service: Service, health_servicer: Any, interval: float) -> None:
    """Keep the health status of "" and ``SERVICE_NAME`` equal to ``service.readiness()``."""
    last = None
    while True:
        try:
            ready, _ = await service.readiness()
        except Exception:
            log.exception("readiness check failed")
            ready = False
        status = (health_pb2.HealthCheckResponse.SERVING if ready
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        if status != last:
            for name in ("", SERVICE_NAME):
                await health_servicer.set(name, status)
            last = status
        await asyncio.sleep(interval)


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def start_grpc_server(service: Service, settings: Settings | None = None, *,
                            health_poll_s: float = HEALTH_POLL_S) -> GrpcServer:
    """Serve ``service`` on ``settings.host:settings.grpc_port`` (port 0: any free port)."""
    settings = settings or service.settings
    size = settings.grpc_max_message_bytes
    options: list[tuple[str, int]] = [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.so_reuseport", 0),  # a port in use is an error, not silently shared
    ]
    if settings.grpc_stream_window_bytes:
        # A fixed window bounds what a stream that is never read (a refused call) holds;
        # grpc's bandwidth probing grows it with the link, up to 1 GiB a stream.
        options += [("grpc.http2.bdp_probe", 0),
                    ("grpc.http2.lookahead_bytes", settings.grpc_stream_window_bytes)]
    server = grpc.aio.server(interceptors=[
        Guard(settings.api_key_set, settings.grpc_max_concurrent_rpcs,
              tolerant=(f"/{SERVICE_NAME}/",), metrics=service.metrics, ops=RPC_OPS)],
        options=options)
    pb_grpc.add_IVVAEServicer_to_server(IVVAEServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    address = _bind_address(settings.host, settings.grpc_port)
    tls = settings.tls_pair()
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        cert, key = tls
        port = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
    if not port:
        raise OSError(f"gRPC cannot listen on {address}")
    await server.start()
    watcher = asyncio.create_task(_watch_readiness(service, health_servicer, health_poll_s))
    return GrpcServer(server, health_servicer, watcher, port)
