"""Admission before any message is read: the API key and the cap on RPCs in flight.

grpc reads a unary request's message before the handler runs, so a handler that checks the
key sees a 64 MB message only after it was buffered (20 unauthenticated streams: +1.4 GB).
A server interceptor runs when the call's metadata arrives, before that: a refused call
gets a handler that ends it without reading (a streaming-request handler, so grpc does not
read the message for it), and an admitted one is counted until it ends.

Guarded: every service but ``grpc.health.v1.Health`` (probes need no key), so reflection
is behind the key too when keys are set.

Malformed messages: grpc answers a request message that does not parse with UNKNOWN or
INTERNAL (the deserializer's exception). For the methods under ``tolerant`` prefixes the
deserializer gives a ``Malformed`` instead: a unary request is refused INVALID_ARGUMENT
here, and a streaming handler refuses it when it reads it.

Refusals here never reach the servicer's meter, so the guard counts them
(``ivvae_requests_total`` with the error code as the outcome, and ``ivvae_errors_total``)
under the RPC's op from ``ops`` (method path to op), or ``other`` for any other method:
never the method name from the wire.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from ...errors import InvalidInput, IVVAEError, Overloaded
from ...metrics import Metrics
from ..auth import check_bearer
from ..metering import OTHER, count_refusal
from .errors import ERROR_CODE_KEY, grpc_status

log = logging.getLogger("ivvae.grpc")

OPEN_SERVICES = ("/grpc.health.v1.Health/",)


class Guard(grpc.aio.ServerInterceptor):
    """``keys``: the API keys (empty: no key needed); ``max_rpcs``: guarded RPCs in flight
    (more are refused UNAVAILABLE, code ``overloaded``). ``metrics``: where refusals are
    counted, each under its method's op in ``ops`` (else ``other``)."""

    def __init__(self, keys: Collection[str], max_rpcs: int,
                 tolerant: tuple[str, ...] = (), *, metrics: Metrics | None = None,
                 ops: Mapping[str, str] | None = None) -> None:
        self.keys = keys
        self.max_rpcs = max_rpcs
        self.tolerant = tolerant
        self.metrics = metrics
        self.ops = dict(ops or {})
        self.active = 0

    def _count_refusal(self, method: str, exc: IVVAEError) -> None:
        count_refusal(self.metrics, self.ops.get(method, OTHER), "grpc", exc.code)

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: Any) -> Any:
        method: str = details.method or ""
        if method.startswith(OPEN_SERVICES):
            return await continuation(details)
        try:
            check_bearer([v for k, v in details.invocation_metadata or ()
                          if k == "authorization" and isinstance(v, str)],
                         self.keys, how="metadata 'authorization: Bearer <key>'")
            if self.active >= self.max_rpcs:
                raise Overloaded(f"the server is at its limit of {self.max_rpcs} RPCs; "
                                 "retry later")
        except IVVAEError as exc:
            log.info("gRPC %s refused before reading: %s", method, exc.code)
            self._count_refusal(method, exc)
            return _refusal(exc)
        handler = await continuation(details)
        return None if handler is None else self._counted(
            handler, tolerant=bool(self.tolerant) and method.startswith(self.tolerant),
            method=method)

    def _counted(self, handler: Any, *, tolerant: bool = False, method: str = "") -> Any:
        """``handler`` with its behaviour counted in ``active`` while it runs (and with
        ``tolerant``, malformed messages as ``Malformed``)."""
        for kind, make in _KINDS:
            inner = getattr(handler, kind)
            if inner is None:
                continue
            deserialize = handler.request_deserializer
            if tolerant and deserialize is not None:
                deserialize = _tolerant(deserialize)
                if kind.startswith("unary_"):
                    inner = _refusing_malformed(
                        inner, lambda exc: self._count_refusal(method, exc))

            if inspect.isasyncgenfunction(inner):  # e.g. reflection's handler
                async def stream(request: Any, context: Any, _inner: Any = inner) -> Any:
                    self.active += 1
                    try:
                        async for response in _inner(request, context):
                            yield response
                    finally:
                        self.active -= 1

                behaviour: Any = stream
            else:
                async def call(request: Any, context: Any, _inner: Any = inner) -> Any:
                    self.active += 1
                    try:
                        return await _inner(request, context)
                    finally:
                        self.active -= 1

                behaviour = call
            return make(behaviour, request_deserializer=deserialize,
                        response_serializer=handler.response_serializer)
        return handler


@dataclass(frozen=True)
class Malformed:
    """A request message that did not parse, and why."""

    detail: str

    def error(self) -> InvalidInput:
        return InvalidInput(f"a request message is not a valid protobuf message of this "
                            f"method: {self.detail}")


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return Malformed(str(exc) or "it does not parse")

    return parse


def _refusing_malformed(inner: Callable[..., Any],
                        counted: Callable[[IVVAEError], None] = lambda exc: None
                        ) -> Callable[..., Any]:
    """``inner``, refusing a ``Malformed`` request (``counted``: the refusal is counted
    there, as ``inner`` never runs)."""

    async def refuse(request: Malformed, context: Any) -> None:
        exc = request.error()
        counted(exc)
        await context.abort(grpc_status(exc), exc.detail,
                            trailing_metadata=((ERROR_CODE_KEY, exc.code),))

    if inspect.isasyncgenfunction(inner):
        async def stream(request: Any, context: Any) -> Any:
            if isinstance(request, Malformed):
                await refuse(request, context)
            async for response in inner(request, context):
                yield response

        return stream

    async def call(request: Any, context: Any) -> Any:
        if isinstance(request, Malformed):
            await refuse(request, context)
        return await inner(request, context)

    return call


_KINDS = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


# A grpc.aio client whose first write is still in flight when the call ends reports
# INTERNAL instead of our status (grpc/grpc#36066). Clients send a small options message
# first; waiting this long before ending the call lets that write land, without reading it.
REFUSAL_GRACE_S = 0.2


def _refusal(exc: IVVAEError) -> Any:
    async def refuse(requests: Any, context: Any) -> None:
        await asyncio.sleep(REFUSAL_GRACE_S)
        await context.abort(grpc_status(exc), exc.detail,
                            trailing_metadata=((ERROR_CODE_KEY, exc.code),))

    # Streaming requests: grpc leaves the messages unread until the handler asks, and this
    # one never asks.
    return grpc.stream_stream_rpc_method_handler(refuse)
