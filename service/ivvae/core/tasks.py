"""Cleanup that outlives a cancelled request.

A client that goes away cancels its request's task. Under an HTTP server the task runs in
an anyio cancel scope, and a cancelled scope cancels *every* later await of that task
again, so a cleanup awaited plainly in a ``finally`` (closing a backend session, closing a
video) stops at its first await: the session's feature cache stays until its time-to-live
and its gauge never comes down. ``finish`` runs the cleanup as a task of its own.

And a time limit that never loses a cancellation (``within``), and one on a whole answer
sent piece by piece (``in_time``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from ..errors import NotTakenInTime

_T = TypeVar("_T")

log = logging.getLogger(__name__)

# Cleanups whose caller was cancelled, kept alive until they end (the loop holds only weak
# references to tasks).
_DETACHED: set[asyncio.Future[None]] = set()


async def finish(cleanup: Awaitable[None]) -> None:
    """Await ``cleanup`` to its end. When the calling task is cancelled meanwhile, the
    cleanup still runs to its end on its own, and the cancellation goes on; an error it
    raises then is logged, as nobody is left to take it."""
    task = asyncio.ensure_future(cleanup)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if task.done():
            _after_detached(task)  # it failed as the caller was cancelled: log it
        else:
            _DETACHED.add(task)
            task.add_done_callback(_after_detached)
        raise


def _after_detached(task: asyncio.Future[None]) -> None:
    _DETACHED.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.warning("a cleanup after a cancelled request failed: %r", task.exception())


async def aclose_all(*iterators: AsyncIterator[Any]) -> None:
    """Close async generators now, in order (their ``finally`` closes a backend session or
    an encoder's thread), not whenever the garbage collector finds them; each is closed
    even when closing one before it failed."""
    error: BaseException | None = None
    for iterator in iterators:
        aclose = getattr(iterator, "aclose", None)
        if aclose is None:
            continue
        try:
            await aclose()
        except BaseException as exc:  # raised below, once the rest are closed
            error = error or exc
    if error is not None:
        raise error


async def within(awaitable: Awaitable[_T], seconds: float) -> _T:
    """``await awaitable``, or ``TimeoutError`` after ``seconds``.

    Not ``asyncio.wait_for``: before Python 3.12 it returns normally when the caller is
    cancelled just as the awaited work completes (gh-86296), so the cancellation is lost:
    a Ctrl-C that arrived while a request slot was being taken let a whole encode run on.
    ``asyncio.timeout`` (3.11) keeps it."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)  # pragma: no cover - Python 3.10


def in_time(send: Callable[[_T], Awaitable[Any]], seconds: float
            ) -> Callable[[_T], Awaitable[None]]:
    """``send`` (an ASGI ``send``, a gRPC ``context.write``), all of whose calls together
    must end within ``seconds`` of now, else ``NotTakenInTime``: a client that stops
    reading an answer holds what the answer holds (a decode session, a share of the memory
    budget) until its connection dies, and nothing else bounds that wait."""
    deadline = time.monotonic() + seconds

    async def send_in_time(message: _T) -> None:
        try:
            await within(send(message), max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            raise NotTakenInTime(f"the client did not read the answer within "
                                 f"{seconds:g} s") from None

    return send_in_time
