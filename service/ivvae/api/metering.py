"""The request meter, one for every transport: requests by outcome, latency, in flight."""

from __future__ import annotations

import asyncio
import time
from types import TracebackType

from starlette.requests import ClientDisconnect

from ..errors import IVVAEError
from ..metrics import Metrics


class RequestMeter:
    """``async with RequestMeter(metrics, op, transport):`` around one request.

    The outcome is ``ok``, the error's code, ``cancelled`` (the client went away: a
    cancelled RPC, or an HTTP client that disconnected mid-upload) or
    ``internal_error``. ``in_flight`` counts the request in ``ivvae_in_flight`` for its
    whole life (gRPC counts only admitted RPCs, so it says when)."""

    def __init__(self, metrics: Metrics, op: str, transport: str, *,
                 in_flight: bool = True) -> None:
        self.metrics, self.op, self.transport = metrics, op, transport
        self._in_flight = in_flight
        self._start = 0.0

    def start(self) -> None:
        self._start = time.perf_counter()
        if self._in_flight:
            self.metrics.in_flight.inc()

    def finish(self, exc: BaseException | None) -> None:
        """Count the request, failed with ``exc`` or (``None``) answered."""
        if exc is None:
            outcome = "ok"
        elif isinstance(exc, IVVAEError):
            outcome = exc.code
        elif isinstance(exc, (asyncio.CancelledError, ClientDisconnect)):
            outcome = "cancelled"
        else:
            outcome = "internal_error"
        if self._in_flight:
            self.metrics.in_flight.dec()
        self.metrics.requests.labels(self.op, self.transport, outcome).inc()
        self.metrics.latency.labels(self.op, self.transport).observe(
            time.perf_counter() - self._start)

    async def __aenter__(self) -> RequestMeter:
        self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.finish(exc)
