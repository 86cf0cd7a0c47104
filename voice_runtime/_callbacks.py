"""Running user callbacks (``on_sms``, ``inbound_parameters``, ``on_event``, ...) off the loop.

A plain function runs on a small thread pool, so a handler that blocks (a database query, a
sync SDK call) delays no call's audio; a coroutine function runs on the loop. The pool is
bounded in threads and in pending work: past ``max_pending`` callbacks waiting or running,
:meth:`CallbackRunner.run` raises :class:`CallbacksBusyError` at once instead of queueing
without limit. Callbacks that share a ``key`` (one session's events) run one at a time, in
the order they were submitted.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from voice_runtime.errors import VoiceRuntimeError

__all__ = ["CallbackRunner", "CallbacksBusyError", "is_async_callable"]


class CallbacksBusyError(VoiceRuntimeError):
    """Too many user callbacks are waiting or running; the request should be refused."""


def is_async_callable(fn: Any) -> bool:
    """True for coroutine functions and for objects whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - the bound __call__ of an instance
    )


class CallbackRunner:
    """Runs user callbacks: sync ones on a bounded pool, async ones on the loop, keyed in order.

    Use from the event loop only. ``shutdown()`` releases the pool's threads; the next
    ``run`` starts a new pool.
    """

    def __init__(self, *, workers: int = 8, max_pending: int = 64, name: str = "vr-callback"):
        if workers < 1 or max_pending < 1:
            raise ValueError("workers and max_pending must be at least 1")
        self.workers = workers
        self.max_pending = max_pending
        self.name = name
        self.pending = 0
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._lanes: dict[Hashable, asyncio.Future[None]] = {}

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=self.name)
            return self._pool

    async def run(self, fn: Callable[..., Any], *args: Any, key: Hashable | None = None) -> Any:
        """Run ``fn(*args)`` off the loop (or on it, if async); return its result.

        Raises CallbacksBusyError when ``max_pending`` callbacks are already in flight, and
        whatever ``fn`` raises.
        """
        if self.pending >= self.max_pending:
            raise CallbacksBusyError("too many user callbacks in flight")
        self.pending += 1
        try:
            if key is None:
                return await self._invoke(fn, args)
            return await self._run_in_lane(key, fn, args)
        finally:
            self.pending -= 1

    async def _run_in_lane(
        self, key: Hashable, fn: Callable[..., Any], args: tuple[Any, ...]
    ) -> Any:
        loop = asyncio.get_running_loop()
        previous = self._lanes.get(key)
        mine: asyncio.Future[None] = loop.create_future()
        self._lanes[key] = mine
        try:
            if previous is not None and not previous.done():
                # asyncio.wait does not cancel ``previous`` when this task is cancelled.
                await asyncio.wait({previous})
            return await self._invoke(fn, args)
        finally:
            if previous is not None and not previous.done():
                # Cancelled while waiting: the next in line still waits for the one before.
                previous.add_done_callback(lambda _: self._release(key, mine))
            else:
                self._release(key, mine)

    def _release(self, key: Hashable, mine: asyncio.Future[None]) -> None:
        if not mine.done():
            mine.set_result(None)
        if self._lanes.get(key) is mine:
            del self._lanes[key]

    async def _invoke(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        if is_async_callable(fn):
            return await fn(*args)
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self._executor(), functools.partial(fn, *args))
        if inspect.isawaitable(result):
            # A plain function that returned a coroutine (a lambda around an async handler).
            result = await result
        return result

    def shutdown(self) -> None:
        """Let the pool's threads end once their current callback returns."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
