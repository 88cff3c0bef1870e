"""Small concurrency tools the cache and the upstream client share.

`SingleFlight` runs one coroutine per key at a time and lets every concurrent
caller await that one result. `TaskOwner` keeps background tasks referenced,
logs their failures, and cancels and awaits them at shut-down, so no task is
fire-and-forget. `cancel_and_wait` is how either stops a task.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

import structlog

K = TypeVar("K")
T = TypeVar("T")

log = structlog.get_logger(__name__)

RECANCEL_AFTER = 1.0


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and return once it has ended.

    A task can swallow a cancellation (redis-py's asyncio client has been seen to while
    a command was in flight), and a single `cancel()` followed by a wait would then wait
    forever: cancel again until it ends, and say so.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=RECANCEL_AFTER)
        if not task.done():
            log.warning("task_ignored_cancellation", task=task.get_name())
    if not task.cancelled():
        task.exception()  # retrieved: an error here was the task's own, already handled


class SingleFlight(Generic[K, T]):
    """Collapse concurrent calls for one key into one execution.

    The work runs in its own task, so a caller that is cancelled (a client that
    hung up) stops waiting without cancelling the work for everyone else.
    """

    def __init__(self) -> None:
        self._running: dict[K, asyncio.Task[T]] = {}
        self._waiting: Counter[K] = Counter()

    async def run(self, key: K, func: Callable[[], Coroutine[Any, Any, T]]) -> T:
        task = self._running.get(key)
        if task is None:
            task = asyncio.create_task(func(), name=f"singleflight:{key}")
            self._running[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        self._waiting[key] += 1
        try:
            return await asyncio.shield(task)
        finally:
            self._waiting[key] -= 1
            if not self._waiting[key]:
                del self._waiting[key]

    def waiting(self, key: K) -> int:
        """How many callers await the run for `key` now."""
        return self._waiting[key]

    def _finished(self, key: K, task: asyncio.Task[T]) -> None:
        if self._running.get(key) is task:
            del self._running[key]
        if not task.cancelled():
            # Retrieve it so an error nobody waited for is not reported as lost.
            task.exception()

    def __len__(self) -> int:
        return len(self._running)

    async def close(self) -> None:
        for task in list(self._running.values()):
            await cancel_and_wait(task)


class TaskOwner:
    """Owns background tasks: keeps them referenced, cancels them at close."""

    def __init__(self, name: str):
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        if self._closed:
            coro.close()
            raise RuntimeError(f"{self.name} is shutting down")
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("background_task_failed", task=task.get_name(), error=repr(exc))

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def closing(self) -> bool:
        """True once `close` began: `spawn` refuses from then on."""
        return self._closed

    async def close(self, grace: float = 0.0) -> None:
        """Let running tasks finish for up to `grace` seconds, then cancel the rest."""
        self._closed = True
        tasks = list(self._tasks)
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        for task in tasks:
            await cancel_and_wait(task)
