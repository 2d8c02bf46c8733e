"""``finish``: a cleanup that outlives its caller's cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import anyio
import pytest

from ivvae.core.tasks import aclose_all, finish, within


async def _cleanup(done: list[str], *, fail: bool = False) -> None:
    for step in ("first", "second"):  # two awaits: a cancel scope cancels each of them
        await asyncio.sleep(0.01)
        done.append(step)
    if fail:
        raise OSError("the backend went away")


async def test_a_cleanup_in_a_cancelled_scope_runs_to_its_end() -> None:
    plain: list[str] = []
    finished: list[str] = []
    with anyio.CancelScope() as scope:
        try:
            scope.cancel()
            await asyncio.sleep(1)
        finally:
            with pytest.raises(asyncio.CancelledError):
                await _cleanup(plain)
            with pytest.raises(asyncio.CancelledError):
                await finish(_cleanup(finished))
    await asyncio.sleep(0.1)
    assert plain == []  # what a plain await in the finally got
    assert finished == ["first", "second"]


async def test_a_cleanup_that_fails_after_its_caller_left_is_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    done: list[str] = []
    task = asyncio.create_task(finish(_cleanup(done, fail=True)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with caplog.at_level(logging.WARNING, "ivvae.core.tasks"):
        await asyncio.sleep(0.1)
    assert done == ["first", "second"]
    assert "the backend went away" in caplog.text


async def test_a_cleanup_error_reaches_a_caller_still_there() -> None:
    with pytest.raises(OSError, match="went away"):
        await finish(_cleanup([], fail=True))


async def test_aclose_all_closes_each_in_order_even_after_a_failure() -> None:
    closed: list[str] = []

    async def gen(name: str, fail: bool = False) -> AsyncIterator[int]:
        try:
            yield 1
        finally:
            closed.append(name)
            if fail:
                raise OSError(f"{name} failed to close")

    first, second, third = gen("first", fail=True), gen("second"), gen("third")
    for g in (first, second, third):
        await anext(g)
    with pytest.raises(OSError, match="first failed"):
        await aclose_all(first, iter([]), second, third)  # type: ignore[arg-type]
    assert closed == ["first", "second", "third"]


async def test_within_never_loses_a_cancellation() -> None:
    # A caller cancelled while the work it waits for completes in the same loop iteration:
    # asyncio.wait_for (before 3.12) returns normally and the caller goes on; a Ctrl-C that
    # came while `ivvae encode` took its request slot was lost, and the encode ran to its end.
    import sys

    async def caller(limit: object) -> None:
        await limit(asyncio.Semaphore(1).acquire(), 5)  # type: ignore[operator]
        await asyncio.sleep(10)  # never reached by a cancelled caller

    async def cancelled_at_once(limit: object) -> bool:
        task = asyncio.ensure_future(caller(limit))
        await asyncio.sleep(0)  # it is waiting now; what it waits for completes next
        task.cancel()
        await asyncio.sleep(0.05)
        lost = not task.done()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return not lost

    assert await cancelled_at_once(within)
    if sys.version_info < (3, 12):  # the bug this guards against is there to see
        assert not await cancelled_at_once(asyncio.wait_for)
