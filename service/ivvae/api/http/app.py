"""The HTTP API: the app factory, its error handlers and its routers.

Routes live in ``routes/`` (health, models, encode, decode, frames), each an ``APIRouter``
on the ``Annotated`` dependencies of ``deps``; the pages for people (``/ui``, ``/docs``,
``/redoc``, from local files) in ``ui``. Errors are JSON ``{"error": code, "detail": text}``;
the status comes from one table (``errors.STATUS``). Bodies are read with a byte cap before
anything parses them.

Open routes (no API key even when ``IVVAE_API_KEYS`` is set): ``/healthz``, ``/readyz`` and
``/metrics`` (probes and scrapers), the pages (``/ui``, ``/docs``, ``/redoc``, their
assets) and ``/openapi.json``. Everything else needs the key (the compare page sends it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ...config import Settings
from ...core.version import __version__
from ...errors import (
    ClientGone,
    InvalidInput,
    IVVAEError,
    NotTakenInTime,
    Overloaded,
    Unauthorized,
)
from ...service import Service
from ..metering import OTHER, count_refusal
from . import ui
from .answers import cut_off_by
from .errors import OTHER_HTTP_CODE, UNSERVED_CODES, http_status, retry_after
from .openapi import key_optional
from .routes import decode, encode, frames, health, models

log = logging.getLogger("ivvae.http")



# The log line of a request answered with an error: method, path, status, code, detail
# (ivvae.server's log limit keys it by the first four).
REFUSAL_LOG = "%s %s -> %d %s: %s"


def error_response(exc: IVVAEError) -> JSONResponse:
    headers = {}
    if (retry := retry_after(exc)) is not None:
        headers["Retry-After"] = retry
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"  # RFC 9110: a 401 says how to authenticate
    return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=http_status(exc),
                        headers=headers or None)


class _Contain:
    """ASGI middleware: an exception the routes did not turn into a response becomes a
    JSON 500 here, inside Starlette's outermost error middleware, which would re-raise it
    to uvicorn, and uvicorn closes the connection after a 500 (so the client's next good
    request on it would fail). A client that went away is not an error, nor is an answer
    cut off after it began by the service's own error (logged as what it is, then the
    connection ends it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            log.debug("client went away during %s %s", scope["method"], scope["path"])
        except asyncio.CancelledError:
            # The server is stopping and the grace for in-flight requests is over (uvicorn
            # cancels them): a 503 the client retries elsewhere, not uvicorn's text 500.
            # Any other cancellation goes on as it came.
            service = getattr(getattr(scope.get("app"), "state", None), "service", None)
            if started or not getattr(service, "stopping", False):
                raise
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):  # Python 3.11+
                task.uncancel()
            log.warning("%s %s cancelled: the server is stopping", scope["method"],
                        scope["path"])
            response = error_response(
                Overloaded("the server is shutting down; retry", retry_after_s=1))
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
        except Exception as exc:
            error = cut_off_by(exc) if started else None
            if isinstance(error, NotTakenInTime):
                log.info("%s %s: %s; resetting the connection", scope["method"],
                         scope["path"], error)
                raise  # the connection (ivvae.api.http.protocol) resets it
            if error is not None:
                log.warning("%s %s: the answer was cut off after it began: %s: %s",
                            scope["method"], scope["path"], error.code, error.detail)
                raise  # the connection (ivvae.api.http.protocol) closes it
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if started:
                raise  # half a response is out: only closing the connection can say so
            response = JSONResponse({"error": IVVAEError.code, "detail": "internal error"},
                                    status_code=500)
            await response(scope, receive, send)


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
    for module in (health, models, encode, decode, frames, ui):
        app.include_router(module.router)
    _add_error_handlers(app)
    app.add_middleware(_Contain)
    if not settings.api_key_set:
        key_optional(app)
    return app


def _count_unserved(request: Request, code: str) -> None:
    """A request no route served (a path or method that is none of ivvae's, a body FastAPI
    refused): counted under op ``other``, so that a client calling the wrong URL shows in
    the metrics, not only in the log."""
    svc = getattr(request.app.state, "service", None)
    if svc is not None:
        count_refusal(svc.metrics, OTHER, "http", code)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(IVVAEError)
    async def _service_error(request: Request, exc: IVVAEError) -> JSONResponse:
        status = http_status(exc)
        (log.warning if status >= 500 else log.info)(REFUSAL_LOG, request.method,
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
        _count_unserved(request, InvalidInput.code)
        return JSONResponse({"error": InvalidInput.code, "detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = UNSERVED_CODES.get(exc.status_code, OTHER_HTTP_CODE)
        _count_unserved(request, code)
        return JSONResponse({"error": code, "detail": str(exc.detail)},
                            status_code=exc.status_code)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
        log.info("%s %s: the client disconnected before the request was complete",
                 request.method, request.url.path)
        # nobody reads it: the status is for the log (ClientGone's, from the one table)
        return Response(status_code=http_status(ClientGone("")))
