"""Answers a client must take in time (``ivvae.core.tasks.in_time``, the request timeout):
one that stops reading holds what the answer holds (a decode session, a share of the memory
budget, the bytes of the answer) until its connection dies, and nothing else bounds that
wait."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import Response, StreamingResponse

from ...core.tasks import aclose_all, finish, in_time
from ...errors import DeadlineExceeded, NotTakenInTime


class StreamedInTime(StreamingResponse):
    """A streamed answer the client must take within ``seconds`` of its start. Between
    decoder steps nothing else waits on the clock."""

    def __init__(self, content: AsyncIterator[bytes], *, seconds: float,
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.content = content
        self.seconds = seconds

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, in_time(send, self.seconds))
        except DeadlineExceeded:
            await finish(aclose_all(self.content))  # the session goes now, not at GC
            raise


def not_taken_in_time(exc: BaseException) -> bool:
    """Whether ``exc``, leaving the app, is an answer's ``NotTakenInTime`` from its
    ``send``: the client's doing, not a server error. Starlette raises it again, once the
    response has started, as a RuntimeError caused by it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, NotTakenInTime):
            return True
        seen = seen.__cause__
    return False


# What building a whole answer holds at most, in copies of its frames: the frames decoded,
# joined into one array, and the body.
HELD_COPIES = 3


# The pieces a whole answer is sent in. The server writes a piece only once the client has
# taken what came before (a send returns at once, however large): one piece of a 500 MB
# answer would sit in the connection's buffer, outside the budget, long after release.
HELD_CHUNK = 1 << 20


class HeldResponse(Response):
    """A whole answer that holds ``release``'s reservation until it is sent (or the client
    took too long: ``seconds``), in pieces of ``HELD_CHUNK`` bytes."""

    def __init__(self, content: bytes, *, release: Callable[[], None], seconds: float,
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.release, self.seconds = release, seconds

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        send = in_time(send, self.seconds)
        body = memoryview(self.body)
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            at = 0
            while True:
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
