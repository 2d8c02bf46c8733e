"""Admission before any message is read: the API key and the cap on RPCs in flight.

grpc reads a unary request's message before the handler runs, so a handler that checks the
key sees a 64 MB message only after it was buffered (20 unauthenticated streams: +1.4 GB).
A server interceptor runs when the call's metadata arrives, before that: a refused call
gets a handler that ends it without reading (a streaming-request handler, so grpc does not
read the message for it), and an admitted one is counted until it ends.

Guarded: every service but ``grpc.health.v1.Health`` (probes need no key), so reflection
is behind the key too when keys are set.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import grpc

from ...errors import IVVAEError, Overloaded
from ..auth import check_bearer
from .errors import ERROR_CODE_KEY, grpc_status

log = logging.getLogger("ivvae.grpc")

OPEN_SERVICES = ("/grpc.health.v1.Health/",)


class Guard(grpc.aio.ServerInterceptor):
    """``keys``: the API keys (empty: no key needed); ``max_rpcs``: guarded RPCs in flight
    (more are refused UNAVAILABLE, code ``overloaded``)."""

    def __init__(self, keys: Collection[str], max_rpcs: int) -> None:
        self.keys = keys
        self.max_rpcs = max_rpcs
        self.active = 0

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
            return _refusal(exc)
        handler = await continuation(details)
        return None if handler is None else self._counted(handler)

    def _counted(self, handler: Any) -> Any:
        """``handler`` with its behaviour counted in ``active`` while it runs."""
        for kind, make in _KINDS:
            inner = getattr(handler, kind)
            if inner is None:
                continue

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
            return make(behaviour, request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
        return handler


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
