"""The request meter, one for every transport: requests by outcome, latency, in flight; and
the count of requests refused before they were served.

Every request is counted in ``ivvae_requests_total`` under an ``op`` from a fixed set, never
text from the wire: the operations (``encode``, ``decode``, ``frames``, ``models``),
``OTHER`` (a gRPC method, or an HTTP path or method, that is none of ivvae's: reflection, a
made-up name, ``GET /encode``) and
``UNROUTED`` (an HTTP request refused by a connection bound before it was routed). Its
``outcome`` is ``ok`` or an error code of ``ivvae.errors``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import TracebackType

from starlette.requests import ClientDisconnect

from ..errors import ClientGone, IVVAEError
from ..metrics import Metrics

OTHER = "other"
UNROUTED = "unrouted"


def count_outcome(metrics: Metrics, op: str, transport: str, outcome: str) -> None:
    """Count one request in ``ivvae_requests_total`` (only: where ``ivvae_errors_total``
    is counted already, as HTTP's error handler does)."""
    metrics.requests.labels(op, transport, outcome).inc()


def count_refusal(metrics: Metrics | None, op: str, transport: str, code: str) -> None:
    """Count a request refused before it was served (a missing or wrong key, a cap on RPCs
    or connections, a head over its bounds): in ``ivvae_requests_total`` with ``code`` as
    its outcome, and in ``ivvae_errors_total``. Not in ``ivvae_request_seconds`` or
    ``ivvae_in_flight_requests``: nothing was served. ``op``: see the module."""
    if metrics is None:
        return
    count_outcome(metrics, op, transport, code)
    metrics.errors.labels(code).inc()


class RequestMeter:
    """``async with RequestMeter(metrics, op, transport):`` around one request.

    The outcome is ``ok``, the error's code, ``cancelled`` (the client went away: a
    cancelled RPC, or an HTTP client that disconnected mid-upload) or
    ``internal_error``. ``in_flight`` counts the request in ``ivvae_in_flight_requests`` for its
    whole life (gRPC counts only admitted RPCs, so it says when)."""

    def __init__(self, metrics: Metrics, op: str, transport: str, *,
                 in_flight: bool = True) -> None:
        self.metrics, self.op, self.transport = metrics, op, transport
        self._in_flight = in_flight
        self._start = 0.0
        self._handed = self._finished = False

    def start(self) -> None:
        self._start = time.perf_counter()
        if self._in_flight:
            self.metrics.in_flight.inc()

    def finish(self, exc: BaseException | None) -> None:
        """Count the request, failed with ``exc`` or (``None``) answered."""
        if self._finished:
            return
        self._finished = True
        if exc is None:
            outcome = "ok"
        elif isinstance(exc, IVVAEError):
            outcome = exc.code
        elif isinstance(exc, (asyncio.CancelledError, ClientDisconnect)):
            outcome = ClientGone.code
        else:
            outcome = IVVAEError.code
        if self._in_flight:
            self.metrics.in_flight.dec()
        self.metrics.requests.labels(self.op, self.transport, outcome).inc()
        self.metrics.latency.labels(self.op, self.transport).observe(
            time.perf_counter() - self._start)

    async def __aenter__(self) -> RequestMeter:
        self.start()
        return self

    def hand_over(self) -> Callable[[BaseException | None], None]:
        """For an answer that goes on after the block (HTTP's streamed and whole answers,
        sent once the route has returned): the request is counted when the answer calls
        what this returns, with what ended it (``None``: all sent), not when the block
        ends. An error then is one no error handler saw, so it is counted here too."""
        self._handed = True

        def answered(exc: BaseException | None) -> None:
            if isinstance(exc, IVVAEError) and not self._finished:
                self.metrics.errors.labels(exc.code).inc()
            self.finish(exc)

        return answered

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc is None and self._handed:
            return
        self.finish(exc)
