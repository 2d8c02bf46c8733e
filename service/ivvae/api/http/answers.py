"""Answers a client must take in time (``ivvae.core.tasks.in_time``, the request timeout):
one that stops reading holds what the answer holds (a decode session, a share of the memory
budget, the bytes of the answer) until its connection dies, and nothing else bounds that
wait."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.responses import Response, StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.types import Message, Send

from ...core.tasks import aclose_all, finish, in_time
from ...errors import DeadlineExceeded, IVVAEError

Counted = Callable[[BaseException | None], None]  # ``RequestMeter.hand_over``


class _Counting:
    """An answer that counts its request: once sent, failed or left (``_counted``), or
    when it is collected without having been called (the request's task was cancelled in
    between, as at shutdown)."""

    counted: Counted | None = None

    def __del__(self) -> None:
        if self.counted is not None:
            self.counted(ClientDisconnect())  # a no-op once counted


async def _counted(answer: Callable[[Send], Awaitable[None]], send: Send,
                   counted: Counted | None) -> None:
    """Send ``answer`` and count its request by how it ended: all sent, failed (the
    exception), or left unfinished without one (Starlette ends a stream quietly when the
    client goes)."""
    complete = False

    async def watched(message: Message) -> None:
        nonlocal complete
        await send(message)
        complete = message["type"] == "http.response.body" and not message.get("more_body")

    try:
        await answer(watched)
    except BaseException as exc:
        if counted is not None:
            counted(exc)
        raise
    if counted is not None:
        counted(None if complete else ClientDisconnect())


class StreamedInTime(_Counting, StreamingResponse):
    """A streamed answer the client must take within ``seconds`` of its start. Between
    decoder steps nothing else waits on the clock."""

    def __init__(self, content: AsyncIterator[bytes], *, seconds: float,
                 counted: Counted | None = None, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.content = content
        self.seconds, self.counted = seconds, counted

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await _counted(lambda sending: super(StreamedInTime, self).__call__(
                scope, receive, in_time(sending, self.seconds)), send, self.counted)
        except DeadlineExceeded:
            await finish(aclose_all(self.content))  # the session goes now, not at GC
            raise


def cut_off_by(exc: BaseException) -> IVVAEError | None:
    """The service's error that ended an answer already begun, if ``exc`` (leaving the app
    once the response has started) is one: the backend gone mid-decode, or the client not
    taking the answer in time (``NotTakenInTime``). Nothing can tell the client any more but
    the connection's end; it is no bug of the server's. Starlette raises it again as a
    RuntimeError caused by it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, IVVAEError):
            return seen
        seen = seen.__cause__
    return None


# What building a whole answer holds at most, in copies of its frames: the frames decoded,
# joined into one array, and the body.
HELD_COPIES = 3


# The pieces a whole answer is sent in. The server writes a piece only once the client has
# taken what came before (a send returns at once, however large): one piece of a 500 MB
# answer would sit in the connection's buffer, outside the budget, long after release.
HELD_CHUNK = 1 << 20


class HeldResponse(_Counting, Response):
    """A whole answer that holds ``release``'s reservation until it is sent (or the client
    took too long: ``seconds``), in pieces of ``HELD_CHUNK`` bytes."""

    def __init__(self, content: bytes, *, release: Callable[[], None], seconds: float,
                 counted: Counted | None = None, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.release, self.seconds, self.counted = release, seconds, counted

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # A send to a client that went away returns at once (uvicorn drops it), so only
        # receive() tells: without it the rest of the answer went nowhere and was counted
        # as sent.
        gone = asyncio.Event()

        async def listen() -> None:
            with contextlib.suppress(Exception):  # a receive that fails tells nothing
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone.set()

        listener = asyncio.ensure_future(listen())
        try:
            await _counted(lambda sending: self._send(sending, gone), send, self.counted)
        finally:
            listener.cancel()

    async def _send(self, send: Send, gone: asyncio.Event) -> None:
        send = in_time(send, self.seconds)
        body = memoryview(self.body)
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            at = 0
            while True:
                await asyncio.sleep(0)  # the listener's turn to see a disconnect
                if gone.is_set():
                    raise ClientDisconnect()
                piece = bytes(body[at : at + HELD_CHUNK])
                at += len(piece)
                await send({"type": "http.response.body", "body": piece,
                            "more_body": at < len(body)})
                if at >= len(body):
                    break
        finally:
            body.release()
            self.body = b""
            self.release()
