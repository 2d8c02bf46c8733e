"""The HTTP API: POST /encode, POST /decode, health, readiness, metrics, models.

Errors are JSON ``{"error": code, "detail": text}``; the status comes from one table
(``errors.STATUS``). Bodies are read with a byte cap before anything parses them.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ... import __version__
from ...config import Settings
from ...errors import EmptyInput, InvalidInput, IVVAEError, TooLarge, Unauthorized, UnsupportedMedia
from ...pipeline import EncodeOptions
from ...safetensors_io import dumps
from ...service import Service
from ...video import Mp4Writer
from .errors import http_status

log = logging.getLogger("ivvae.http")

MULTIPART_SLACK = 64 * 1024  # boundary lines and part headers around the file
LATENT_MEDIA_TYPE = "application/octet-stream"
FRAMES_ACCEPT = ("application/x-safetensors", "application/octet-stream")
_VIDEO_TYPES = ("video/", "image/", "application/octet-stream")
CLIENT_DISCONNECTED = "client_disconnected"  # the outcome label: not a server error
CLIENT_CLOSED_REQUEST = 499  # nginx's status for it, in access logs


def error_response(exc: IVVAEError) -> JSONResponse:
    return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=http_status(exc))


async def read_body(request: Request, limit: int) -> tuple[bytes, str]:
    """The uploaded file's bytes and content type: multipart field ``file`` or raw body.

    Reading stops as soon as the cap is passed (413), before any parsing.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + MULTIPART_SLACK:
        raise TooLarge(f"the upload is {int(declared)} bytes; the limit is {limit}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit + MULTIPART_SLACK:
            raise TooLarge(f"the upload exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith("multipart/form-data"):
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        sub = Request(request.scope, receive)
        try:
            form = await sub.form(max_files=1, max_fields=16)
        except Exception as exc:  # the multipart parser raises several types
            raise InvalidInput(f"malformed multipart body: {exc}") from exc
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidInput("the multipart body needs a file field named 'file'")
        data = await upload.read()
        await form.close()
        ctype = (upload.content_type or "application/octet-stream").lower()
    else:
        data = body
    if len(data) > limit:
        raise TooLarge(f"the file is {len(data)} bytes; the limit is {limit}")
    if not data:
        raise EmptyInput("the request body is empty: send a file")
    return data, ctype


def get_service(request: Request) -> Service:
    svc: Service = request.app.state.service
    return svc


Svc = Annotated[Service, Depends(get_service)]


def authorize(request: Request) -> None:
    """``Authorization: Bearer <key>`` when API keys are configured (constant-time compare)."""
    keys = get_service(request).settings.api_key_set
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not any(
        hmac.compare_digest(token.strip().encode(), k.encode()) for k in keys
    ):
        raise Unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>'")


def create_app(settings: Settings | None = None, *, service: Service | None = None) -> FastAPI:
    """Build the app. Without ``service`` it creates one and runs its lifecycle."""
    settings = settings or (service.settings if service else Settings())
    owned = service is None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = service or Service(settings)
        app.state.service = svc
        if owned:
            await svc.start()
        try:
            yield
        finally:
            if owned:
                await svc.close()

    app = FastAPI(
        title="ivvae",
        version=__version__,
        summary="IV-VAE latents for video: POST a video to /encode, a latent to /decode.",
        lifespan=lifespan,
        docs_url=None, redoc_url=None,  # served by .ui from local assets, not a CDN
    )
    from .ui import router as ui_router  # here: ui imports this module

    app.include_router(ui_router)
    Auth = Depends(authorize)

    async def observed(svc: Service, op: str, work: Callable[[], Awaitable[Response]]
                       ) -> Response:
        m = svc.metrics
        start = time.perf_counter()
        m.in_flight.inc()
        outcome = "ok"
        try:
            return await work()
        except IVVAEError as exc:
            outcome = exc.code
            raise
        except ClientDisconnect:  # the client went away (e.g. failed to read its own file)
            outcome = CLIENT_DISCONNECTED
            raise
        except Exception:
            outcome = "internal_error"
            raise
        finally:
            m.in_flight.dec()
            m.requests.labels(op, "http", outcome).inc()
            m.latency.labels(op, "http").observe(time.perf_counter() - start)

    @app.exception_handler(IVVAEError)
    async def _service_error(request: Request, exc: IVVAEError) -> JSONResponse:
        status = http_status(exc)
        (log.warning if status >= 500 else log.info)("%s %s -> %d %s: %s", request.method,
                                                     request.url.path, status, exc.code,
                                                     exc.detail)
        svc = getattr(request.app.state, "service", None)
        if svc is not None:
            svc.metrics.errors.labels(exc.code).inc()
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
            for e in exc.errors()
        )
        return JSONResponse({"error": "invalid_input", "detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": code, "detail": str(exc.detail)},
                            status_code=exc.status_code)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
        log.info("%s %s: the client disconnected before the request was complete",
                 request.method, request.url.path)
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it: for the log

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal_error", "detail": "internal error"},
                            status_code=500)

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: models loaded and backend ready")
    async def readyz(svc: Svc) -> JSONResponse:
        ok, body = await svc.readiness()
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics(svc: Svc) -> PlainTextResponse:
        return PlainTextResponse(svc.metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/models", summary="Served models", dependencies=[Auth])
    async def models(svc: Svc) -> dict[str, Any]:
        return {
            "default": svc.backend.default_model,
            "models": [m.as_dict() for m in svc.backend.models.values()],
        }

    @app.post(
        "/encode",
        summary="Encode a video (or image) to an IV-VAE latent file (.safetensors)",
        dependencies=[Auth],
        response_class=Response,
        responses={200: {"content": {LATENT_MEDIA_TYPE: {}},
                         "description": "the latent file; headers X-Cache, X-Latent-Shape"}},
    )
    async def encode(
        request: Request,
        svc: Svc,
        model: Annotated[str, Query(description="model name; default: the first served")] = "",
        sample: Annotated[bool, Query(description="sample the posterior (else its mean)")] = False,
        seed: Annotated[int | None, Query(ge=0, description="seed for sample=true")] = None,
        dtype: Annotated[Literal["float32", "bfloat16", "float16"],
                         Query(description="stored latent dtype")] = "float32",
        moments: Annotated[bool, Query(description="also store mu and logvar")] = False,
    ) -> Response:
        async def work() -> Response:
            data, ctype = await read_body(request, settings.max_upload_bytes)
            if ctype and not ctype.startswith(_VIDEO_TYPES):
                raise UnsupportedMedia(
                    f"content type {ctype!r} is not a video or image; send the file as "
                    "multipart field 'file' or with a video/* or image/* content type"
                )
            options = EncodeOptions(model=model, sample=sample, seed=seed, dtype=dtype,
                                    include_moments=moments)
            result = await svc.pipeline.encode(data, options)
            info = result.info
            name = f"{info.content_sha256[:16]}.latent.safetensors"
            return Response(result.data, media_type=LATENT_MEDIA_TYPE, headers={
                "X-Cache": "hit" if result.cache_hit else "miss",
                "X-Latent-Shape": ",".join(str(s) for s in result.latent_shape),
                "X-Model": info.model_name,
                "Content-Disposition": f'attachment; filename="{name}"',
            })

        return await observed(svc, "encode", work)

    @app.post(
        "/decode",
        summary="Decode a latent file to video/mp4 (or raw uint8 frames as safetensors)",
        dependencies=[Auth],
        response_class=Response,
        responses={200: {"content": {"video/mp4": {}, "application/x-safetensors": {}}}},
    )
    async def decode(
        request: Request,
        svc: Svc,
        format: Annotated[Literal["mp4", "frames"] | None,
                          Query(description="mp4 (default) or frames (uint8 safetensors); "
                                "also chosen by Accept: application/x-safetensors")] = None,
        crf: Annotated[int, Query(ge=0, le=51, description="H.264 quality (lower=better)")] = 18,
    ) -> Response:
        accept = request.headers.get("accept", "")
        want_frames = format == "frames" or (format is None and any(
            a in accept for a in FRAMES_ACCEPT))

        async def work() -> Response:
            data, _ = await read_body(request, settings.max_upload_bytes)
            info, frames = await svc.pipeline.decode_frames(data)
            headers = {"X-Model": info.model_name, "X-Frames": str(info.num_frames),
                       "X-Width": str(info.width), "X-Height": str(info.height)}
            if want_frames:
                parts = [f async for f in frames]
                meta = {"num_frames": str(info.num_frames), "height": str(info.height),
                        "width": str(info.width),
                        "fps": f"{info.fps.numerator}/{info.fps.denominator}",
                        "model_name": info.model_name, "layout": "THWC uint8 RGB"}
                body = dumps({"frames": np.concatenate(parts)}, meta)
                return Response(body, media_type="application/x-safetensors", headers=headers)
            sink = io.BytesIO()
            writer = Mp4Writer(sink, width=info.width, height=info.height, fps=info.fps,
                               crf=crf)
            try:
                async for part in frames:
                    await asyncio.to_thread(writer.write, part)
            finally:
                await asyncio.to_thread(writer.close)
            return Response(sink.getvalue(), media_type="video/mp4", headers=headers)

        return await observed(svc, "decode", work)

    return app
