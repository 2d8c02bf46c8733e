"""Answers a client must take in time (``ivvae.core.tasks.in_time``, the request timeout):
one that stops reading holds what the answer holds (a decode session, a share of the memory
budget, the bytes of the answer) until its connection dies, and nothing else bounds that
wait."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import Response, StreamingResponse

from ...core.tasks import aclose_all, finish, in_time
from ...errors import DeadlineExceeded


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


# What building a whole answer holds at most, in copies of its frames: the frames decoded,
# joined into one array, and the body.
HELD_COPIES = 3


class HeldResponse(Response):
    """A whole answer that holds ``release``'s reservation until it is sent (or the client
    took too long: ``seconds``)."""

    def __init__(self, content: bytes, *, release: Callable[[], None], seconds: float,
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.release, self.seconds = release, seconds

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, in_time(send, self.seconds))
        finally:
            self.body = b""
            self.release()
