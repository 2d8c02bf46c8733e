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
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ... import __version__
from ...config import Settings
from ...core.names import CRF_RANGE, DEFAULT_CRF
from ...errors import EmptyInput, InvalidInput, IVVAEError, TooLarge, Unauthorized, UnsupportedMedia
from ...latents import decode_latent_file
from ...pipeline import FramesUpload
from ...service import Service
from ...video import Mp4Writer
from ...wire import (
    DecodeTarget,
    check_latent_values,
    is_ivvae_latent_file,
    read_bare_latent,
    read_raw_tensor,
    tensor_to_float32,
)
from . import tensors
from .errors import http_status

log = logging.getLogger("ivvae.http")

MULTIPART_SLACK = 64 * 1024  # boundary lines and part headers around the file
LATENT_MEDIA_TYPE = "application/octet-stream"
FRAMES_ACCEPT = ("application/x-safetensors", "application/octet-stream")
_VIDEO_TYPES = ("video/", "image/", "application/octet-stream")


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
    )
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
        summary="Encode a video (or image, or frames as a tensor) to an IV-VAE latent",
        description=tensors.__doc__ or "",
        dependencies=[Auth],
        response_class=Response,
        responses={200: {"content": {LATENT_MEDIA_TYPE: {}},
                         "description": "the latent file (headers X-Cache, X-Latent-Shape), "
                         "or a raw tensor body (headers shape, dtype)"}},
    )
    async def encode(request: Request, svc: Svc) -> Response:
        async def work() -> Response:
            form = tensors.parse_encode(request.query_params.multi_items())
            data, ctype = await read_body(request, settings.max_upload_bytes)
            sources: list[bytes | FramesUpload]
            if form.tensor_shape is not None:
                sources = [FramesUpload(f, fps=form.fps) for f in
                           tensors.frames_of_tensor(data, form, settings.max_upload_bytes)]
            else:
                if ctype and not ctype.startswith(_VIDEO_TYPES):
                    raise UnsupportedMedia(
                        f"content type {ctype!r} is not a video or image; send the file as "
                        "multipart field 'file' or with a video/* or image/* content type"
                    )
                sources = [data]
            if form.output == "file" and len(sources) > 1:
                raise InvalidInput(f"a latent file holds one video; this tensor has a batch "
                                   f"of {len(sources)}: ask for output_type=pt")
            results = [await svc.pipeline.encode(src, form.options) for src in sources]
            result = results[0]
            info = result.info
            headers = {
                "X-Cache": "hit" if all(r.cache_hit for r in results) else "miss",
                "X-Latent-Shape": ",".join(str(s) for s in result.latent_shape),
                "X-Model": info.model_name,
            }
            if form.output == "pt":
                model = svc.pipeline.model(form.options.model)
                latents = [decode_latent_file(r.data)[0] for r in results]
                body, tensor_headers = tensors.latent_answer(
                    latents, form, model.scale_factor, model.shift_factor)
                return Response(body, media_type=tensors.TENSOR_MEDIA_TYPE,
                                headers={**headers, **tensor_headers})
            name = f"{info.content_sha256[:16]}.latent.safetensors"
            headers["Content-Disposition"] = f'attachment; filename="{name}"'
            return Response(result.data, media_type=LATENT_MEDIA_TYPE, headers=headers)

        return await observed(svc, "encode", work)

    @app.post(
        "/decode",
        summary="Decode a latent (file, bare latent or raw tensor) to video/mp4, frames or "
                "a tensor",
        description=tensors.__doc__ or "",
        dependencies=[Auth],
        response_class=Response,
        responses={200: {"content": {"video/mp4": {}, "application/x-safetensors": {},
                                     "application/zip": {}, "application/octet-stream": {}}}},
    )
    async def decode(request: Request, svc: Svc) -> Response:
        async def work() -> Response:
            form = tensors.parse_decode(request.query_params.multi_items(),
                                        request.headers.get("accept", ""), CRF_RANGE,
                                        DEFAULT_CRF)
            data, _ = await read_body(request, settings.max_upload_bytes)
            items: list[AsyncIterator[np.ndarray]]
            batched = False
            if form.tensor_shape is not None:
                raw = read_raw_tensor(data, form.tensor_shape, form.tensor_dtype)
                latent = check_latent_values(tensor_to_float32(raw), form.tensor_dtype)
                batched = len(form.tensor_shape) == 5
                info, items = await svc.pipeline.decode_bare(
                    latent, form.tensor_dtype, DecodeTarget.parse(form.target_params))
            elif is_ivvae_latent_file(data):
                if form.target_params:
                    raise InvalidInput(
                        f"parameter {form.target_params[0][0]!r} is for bare latents: a "
                        "latent file from /encode says its own model, size and fps")
                info, frames = await svc.pipeline.decode_frames(data)
                items = [frames]
            else:
                latent, dtype = read_bare_latent(data)
                batched = True
                info, items = await svc.pipeline.decode_bare(
                    latent, dtype, DecodeTarget.parse(form.target_params))
            batched = (batched and len(items) > 1) or form.output == "pt"
            headers = {"X-Model": info.model_name, "X-Frames": str(info.num_frames),
                       "X-Width": str(info.width), "X-Height": str(info.height),
                       "X-Batch": str(len(items))}
            if form.output in ("frames", "pt"):
                body, media, extra = await tensors.frames_answer(items, info, form, batched)
                return Response(body, media_type=media, headers={**headers, **extra})
            videos = []
            for frames in items:
                sink = io.BytesIO()
                writer = Mp4Writer(sink, width=info.width, height=info.height, fps=info.fps,
                                   crf=form.crf)
                try:
                    async for part in frames:
                        await asyncio.to_thread(writer.write, part)
                finally:
                    await asyncio.to_thread(writer.close)
                videos.append(sink.getvalue())
            if len(videos) > 1:
                return Response(tensors.zip_of(videos), media_type="application/zip",
                                headers=headers)
            return Response(videos[0], media_type="video/mp4", headers=headers)

        return await observed(svc, "decode", work)

    return app
