"""Answers a client must take in time: one that stops reading holds what the answer holds
(a decode session, a share of the memory budget, the bytes of the answer) until its
connection dies, and nothing else bounds that wait."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi.responses import Response

from ...core.tasks import within
from ...errors import DeadlineExceeded


def in_time(send: Any, seconds: float) -> Any:
    """``send``, each message of which must go within ``seconds`` of now, all together
    (``DeadlineExceeded`` after)."""
    deadline = time.monotonic() + seconds

    async def send_in_time(message: Any) -> None:
        try:
            await within(send(message), max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            raise DeadlineExceeded(f"the client did not read the answer within "
                                   f"{seconds:g} s") from None

    return send_in_time


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
