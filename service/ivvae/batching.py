"""The micro-batcher: one model call for compatible steps of concurrent requests.

Callers ``await batcher.submit(key, item)``. Items with equal keys (same model and
direction) that arrive within ``max_delay_s`` of the first one, up to ``max_batch_size``,
are handed over as one list to ``run_batch(key, items)`` on a worker thread, which returns
one result per item. While a batch runs, new arrivals queue, so batches grow with load on
their own. It only collects: grouping by shape and isolating a failing item are the step
engine's (``ivvae.core.steps.SequenceTable``). A caller that goes away (cancelled future)
is skipped; should ``run_batch`` itself raise, every item of that call gets the error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger("ivvae.batching")

K = TypeVar("K", bound=Hashable)
In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class _Pending(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out]


@dataclass
class _Queue(Generic[In, Out]):
    items: list[_Pending[In, Out]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class MicroBatcher(Generic[K, In, Out]):
    def __init__(
        self,
        run_batch: Callable[[K, Sequence[In]], Sequence[Out]],
        *,
        executor: Executor,
        max_batch_size: int = 8,
        max_delay_s: float = 0.005,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self._run_batch = run_batch
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self._queues: dict[K, _Queue[In, Out]] = {}
        # One batch at a time: the model uses all cores for one call.
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, key: K, item: In) -> Out:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Out] = loop.create_future()
        queue = self._queues.setdefault(key, _Queue())
        queue.items.append(_Pending(item, future))
        if len(queue.items) >= self.max_batch_size:
            self._flush(key)
        elif queue.timer is None:
            queue.timer = loop.call_later(self.max_delay_s, self._flush, key)
        return await future

    def _flush(self, key: K) -> None:
        queue = self._queues.get(key)
        if queue is None or not queue.items:
            return
        if queue.timer is not None:
            queue.timer.cancel()
            queue.timer = None
        batch = queue.items[: self.max_batch_size]
        del queue.items[: self.max_batch_size]
        if queue.items:  # leftovers get their own (immediate) turn
            queue.timer = asyncio.get_running_loop().call_later(0, self._flush, key)
        else:
            del self._queues[key]
        task = asyncio.get_running_loop().create_task(self._execute(key, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, key: K, batch: list[_Pending[In, Out]]) -> None:
        async with self._lock:
            live = [p for p in batch if not p.future.done()]
            if not live:
                return
            loop = asyncio.get_running_loop()
            try:
                results = await loop.run_in_executor(
                    self._executor, self._run_batch, key, [p.item for p in live]
                )
                if len(results) != len(live):
                    raise RuntimeError(f"batch returned {len(results)} results for {len(live)}")
            except Exception as exc:
                log.exception("a batch of %d failed", len(live))
                for p in live:
                    _settle(p.future, exc=exc)
                return
            for p, r in zip(live, results, strict=True):
                _settle(p.future, result=r)

    async def close(self) -> None:
        for queue in self._queues.values():
            if queue.timer is not None:
                queue.timer.cancel()
            for p in queue.items:
                if not p.future.done():
                    p.future.cancel()
        self._queues.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _settle(future: asyncio.Future[Out], *, result: Out | None = None,
            exc: BaseException | None = None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)  # type: ignore[arg-type]
