"""``ivvae serve``: one Service, served over HTTP (uvicorn) and gRPC, in one event loop.

SIGTERM/SIGINT stop both gracefully: both stop accepting, in-flight requests get
``shutdown_grace_s`` to finish (then HTTP answers 503, gRPC UNAVAILABLE: both retryable),
then the backend and cache close. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .api.http.app import REFUSAL_LOG
from .config import Settings, unknown_variables
from .service import Service

log = logging.getLogger("ivvae.server")

# Per message template: this many records per window, then one note of how many were held
# back. A flood of one error (a client hammering a bad request, asyncio's callback
# tracebacks when file descriptors run out) must not fill a disk.
LOG_BURST = 20
LOG_WINDOW_S = 60.0


# The access line is one template for every request: keyed by what tells requests apart.
# uvicorn's args: (client, method, path, http version, status).
_ACCESS = ("uvicorn.access", '%s - "%s %s HTTP/%s" %d')
# The refusal line of a routed request (its path is a route's): method, path, status, code.
_REFUSAL = ("ivvae.http", REFUSAL_LOG)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
SERVED_BURST_FACTOR = 50  # answers below 400: 1,000 lines a minute per route and status


class RateLimit(logging.Filter):
    """Lets through ``burst`` records per (logger, level, message template) per
    ``window_s``; the first record of the next window says how many were dropped.

    The access line is keyed by status too, and by method and path where the path is a
    route's (answers below 400, which get ``SERVED_BURST_FACTOR`` times the burst: each is
    a request served); an error's path is left out (a scanner asks for a new one each
    time). The refusal line of a routed request is keyed by its method, path, status and
    code. So one client hammering one bad request is cut, while other traffic shows."""

    def __init__(self, burst: int = LOG_BURST, window_s: float = LOG_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst, self.window_s, self._clock = burst, window_s, clock
        self._seen: dict[tuple[object, ...], list[float | int]] = {}  # start, passed, dropped
        self._lock = threading.Lock()

    def _key(self, record: logging.LogRecord) -> tuple[tuple[object, ...], int]:
        key: tuple[object, ...] = (record.name, record.levelno, str(record.msg))
        args = record.args if isinstance(record.args, tuple) else ()
        if (record.name, str(record.msg)) == _ACCESS and len(args) == 5:
            _, method, path, _, status = args
            method = method if method in _METHODS else "other"
            if isinstance(status, int) and status < 400:
                return (*key, method, str(path).split("?", 1)[0], status), (
                    self.burst * SERVED_BURST_FACTOR)
            return (*key, method, status), self.burst
        if (record.name, str(record.msg)) == _REFUSAL and len(args) == 5:
            return key + tuple(str(a) for a in args[:4]), self.burst
        return key, self.burst

    def filter(self, record: logging.LogRecord) -> bool:
        key, burst = self._key(record)
        now = self._clock()
        with self._lock:
            state = self._seen.get(key)
            if state is None or now - state[0] >= self.window_s:
                dropped = int(state[2]) if state is not None else 0
                if len(self._seen) > 10_000:  # many distinct keys: forget old windows
                    self._seen.clear()
                self._seen[key] = [now, 1, 0]
                if dropped:
                    record.msg = f"{record.msg} [{dropped} more like this were not logged]"
                return True
            if state[1] < burst:
                state[1] += 1
                return True
            state[2] += 1
            return False


_LIMITER = RateLimit()


def limit_logging(limiter: logging.Filter = _LIMITER) -> logging.Filter:
    """Put ``limiter`` on every handler of the root logger and uvicorn's loggers (again
    after uvicorn adds its handlers; a handler gets it once)."""
    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            if limiter not in handler.filters:
                handler.addFilter(limiter)
    return limiter


def _quiet_server_class(handshake_timeout_s: float) -> type:
    import uvicorn

    class QuietServer(uvicorn.Server):
        """uvicorn without its own signal handling: ``serve`` decides when to stop (and
        uvicorn would re-raise the signal afterwards, killing us before cleanup); with TLS,
        a handshake bounded like a request head (asyncio's default is 60 s, and uvicorn
        does not pass one)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

        async def startup(self, sockets: Any = None) -> None:
            loop = asyncio.get_running_loop()
            create_server = loop.create_server

            def bounded(*args: Any, **kwargs: Any) -> Any:
                if kwargs.get("ssl") is not None:
                    kwargs.setdefault("ssl_handshake_timeout", handshake_timeout_s)
                return create_server(*args, **kwargs)

            loop.create_server = bounded  # type: ignore[method-assign]
            try:
                await super().startup(sockets)
            finally:
                del loop.create_server  # the instance attribute: the method again

    return QuietServer


def configuration_warnings(settings: Settings,
                           environ: Mapping[str, str] | None = None) -> list[str]:
    """What an operator should hear at start-up: IVVAE_* names nothing reads, and an open
    API where a key was probably meant."""
    environ = os.environ if environ is None else environ
    lines = unknown_variables(environ)
    if not settings.api_key_set:
        if environ.get("IVVAE_API_KEY", "").strip():
            lines.append("IVVAE_API_KEY is the key clients send; the gateway's keys are "
                         "IVVAE_API_KEYS, which is empty: every route is open")
        elif not _loopback(settings.host):
            lines.append(f"IVVAE_API_KEYS is empty and the gateway listens on "
                         f"{settings.host}: every route is open to whoever reaches it")
    return lines


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def serve(settings: Settings) -> None:
    import uvicorn

    _QuietServer = _quiet_server_class(settings.http_header_timeout_s)

    from .api.http import create_app
    from .api.http.protocol import ConnectionLimits, bounded_protocol

    if not (settings.enable_http or settings.enable_grpc):
        raise ValueError("both HTTP and gRPC are disabled; enable at least one")
    limit_logging()
    for line in configuration_warnings(settings):
        log.warning("%s", line)
    service = Service(settings)
    await service.start()
    stop, force = asyncio.Event(), asyncio.Event()
    http_server: uvicorn.Server | None = None
    grpc_server = None

    def on_signal() -> None:
        service.stopping = True
        if not stop.is_set():
            stop.set()
            return
        log.warning("second signal: stopping now, in-flight requests are cancelled")
        force.set()
        if http_server is not None:
            http_server.force_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    tasks: list[asyncio.Task[None]] = []
    ended: asyncio.Task[None] | None = None
    try:
        if settings.enable_grpc:
            from .api.grpc.server import start_grpc_server

            grpc_server = await start_grpc_server(service, settings)
            log.info("gRPC listening on %s:%d%s", settings.host, grpc_server.port,
                     " (TLS)" if settings.tls_cert else "")
        if settings.enable_http:
            app = create_app(settings, service=service)
            limits = ConnectionLimits(
                max_header_bytes=settings.http_max_header_bytes,
                max_headers=settings.http_max_headers,
                header_timeout_s=settings.http_header_timeout_s,
                body_timeout_s=settings.http_body_timeout_s,
                body_min_rate=settings.min_upload_rate,
                max_connections=settings.max_connections,
            )
            config = uvicorn.Config(app, host=settings.host, port=settings.port,
                                    log_level=settings.log_level.lower(), lifespan="on",
                                    http=bounded_protocol(limits, service.metrics),
                                    h11_max_incomplete_event_size=limits.max_header_bytes,
                                    timeout_keep_alive=settings.http_keepalive_s,  # type: ignore[arg-type]
                                    timeout_graceful_shutdown=max(
                                        1, round(settings.shutdown_grace_s)),
                                    ssl_certfile=settings.tls_cert or None,
                                    ssl_keyfile=settings.tls_key or None)
            http_server = _QuietServer(config)
            limit_logging()  # after uvicorn.Config, which installs uvicorn's handlers
            tasks.append(asyncio.create_task(http_server.serve()))
            log.info("HTTP%s listening on %s:%d", "S" if settings.tls_cert else "",
                     settings.host, settings.port)
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        # The HTTP server ended without a signal: it could not start (a TLS file it cannot
        # use) or it failed. That is an exit with the reason, never a quiet exit 0.
        ended = next((t for t in tasks if t in done), None)
    finally:
        service.stopping = True
        log.info("shutting down: in-flight requests get up to %gs",
                 settings.shutdown_grace_s)
        if http_server is not None:
            http_server.should_exit = True
        if grpc_server is not None:
            stopping = asyncio.ensure_future(grpc_server.stop(settings.shutdown_grace_s))
            forced = asyncio.ensure_future(force.wait())
            await asyncio.wait([stopping, forced], return_when=asyncio.FIRST_COMPLETED)
            if not stopping.done():
                await grpc_server.stop(None)  # cancels the calls still running
                await stopping
            forced.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await service.close()
    if ended is not None and not stop.is_set():
        failure = None if ended.cancelled() else ended.exception()
        if failure is not None:
            raise RuntimeError(f"the HTTP server failed: {failure}") from failure
        raise RuntimeError("the HTTP server stopped on its own (see the log above)")
