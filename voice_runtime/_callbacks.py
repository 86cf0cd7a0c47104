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
import logging
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from voice_runtime._sync import running_loop
from voice_runtime.errors import VoiceRuntimeError

__all__ = ["CallbackLane", "CallbackRunner", "CallbacksBusyError", "is_async_callable"]

logger = logging.getLogger(__name__)

# How long the end of a call waits for its session's callbacks still running.
DRAIN_TIMEOUT_S = 5.0


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

    def __init__(
        self,
        *,
        workers: int = 8,
        max_pending: int = 64,
        name: str = "vr-callback",
        loop_executor: bool = False,
    ):
        if workers < 1 or max_pending < 1:
            raise ValueError("workers and max_pending must be at least 1")
        # With loop_executor the loop's default executor runs sync callbacks (no own pool).
        self.loop_executor = loop_executor
        self.workers = workers
        self.max_pending = max_pending
        self.name = name
        self.pending = 0
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._lanes: dict[Hashable, asyncio.Future[None]] = {}

    def _executor(self) -> ThreadPoolExecutor | None:
        if self.loop_executor:
            return None
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.workers, thread_name_prefix=self.name, initializer=self._started
                )
            return self._pool

    async def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        key: Hashable | None = None,
        bounded: bool = True,
    ) -> Any:
        """Run ``fn(*args)`` off the loop (or on it, if async); return its result.

        Raises CallbacksBusyError when ``max_pending`` callbacks are already in flight (unless
        ``bounded`` is False: a :class:`CallbackLane` bounds its own), and whatever ``fn``
        raises.
        """
        if not bounded:  # counted by its lane, not against the shared budget
            return (
                await self._invoke(fn, args)
                if key is None
                else await self._run_in_lane(key, fn, args)
            )
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

    def _started(self) -> None:
        self._threads.add(threading.current_thread())

    async def aclose(self, timeout: float = 2.0) -> bool:
        """Shut the pool down and wait (bounded) until its idle threads have ended.

        A callback still blocking holds its thread past ``timeout``; returns False then.
        """
        self.shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(t.is_alive() for t in self._threads):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        self._threads.clear()
        return True

    def shutdown(self) -> None:
        """Let the pool's threads end once their current callback returns."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


class CallbackLane:
    """One session's user callbacks fired from the loop thread: off the loop, in order.

    :meth:`fire` returns at once; the callback runs on :attr:`runner` (the server's, once it
    serves the session; until then a runner on the loop's default executor) in the lane of
    this session, so its callbacks never overlap and keep their order.

    One lane holds at most ``max_in_flight`` callbacks: past that, :meth:`fire` drops the
    callback (counted in :attr:`dropped`, logged) unless it is ``essential``
    (``on_disconnected``). Lanes do not draw on the runner's shared ``max_pending``, so a
    caller flooding DTMF at a slow ``on_dtmf`` costs other calls' callbacks nothing (a lane
    has at most one callback in the pool at a time).
    """

    def __init__(self, key: Hashable, *, max_in_flight: int = 32) -> None:
        self.key = key
        self.max_in_flight = max_in_flight
        self.runner: CallbackRunner | None = None
        self._fallback: CallbackRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.dropped = 0

    def _runner(self) -> CallbackRunner:
        if self.runner is not None:
            return self.runner
        if self._fallback is None:
            self._fallback = CallbackRunner(loop_executor=True)
        return self._fallback

    @property
    def in_flight(self) -> int:
        """Callbacks fired and not yet finished."""
        return len(self._tasks)

    def dispatch(
        self,
        loop: asyncio.AbstractEventLoop | None,
        fn: Callable[..., Any],
        *args: Any,
        what: str,
        essential: bool = False,
    ) -> None:
        """Run a user callback without blocking ``loop`` (the session's).

        On the loop thread it is fired into this lane; from any other thread it runs inline
        (0.1.x callers of ``signal_disconnected`` expect ``on_disconnected`` to have run when
        it returns), a coroutine it returns going to the loop.
        """
        if loop is not None and running_loop() is loop:
            self.fire(fn, *args, what=what, essential=essential)
            return
        try:
            result = fn(*args)
        except Exception:
            logger.exception("user callback failed", extra={"callback": what})
            return
        if asyncio.iscoroutine(result):
            if loop is not None and loop.is_running():
                asyncio.run_coroutine_threadsafe(result, loop)
            else:
                result.close()

    def fire(self, fn: Callable[..., Any], *args: Any, what: str, essential: bool = False) -> None:
        """Run ``fn(*args)`` in this lane; a failure is logged (loop thread only)."""
        if len(self._tasks) >= self.max_in_flight and not essential:
            self.dropped += 1
            logger.warning(
                "user callback dropped: too many in flight",
                extra={"callback": what, "dropped": self.dropped},
            )
            return
        task = asyncio.get_running_loop().create_task(self._run(fn, args, what), name=f"vr-{what}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def call(self, fn: Callable[..., Any], *args: Any, what: str) -> Any:
        """Run ``fn(*args)`` in this lane and return its result; a failure is logged (None)."""
        return await self._run(fn, args, what)

    async def _run(self, fn: Callable[..., Any], args: tuple[Any, ...], what: str) -> Any:
        try:
            return await self._runner().run(fn, *args, key=self.key, bounded=False)
        except Exception:
            logger.exception("user callback failed", extra={"callback": what})
        return None

    async def drain(self, timeout: float = DRAIN_TIMEOUT_S) -> bool:
        """Wait until the callbacks fired so far have finished; False on timeout."""
        if not self._tasks:
            return True
        _done, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        if pending:
            logger.warning(
                "user callbacks still running at the end of the call",
                extra={"pending": len(pending)},
            )
        return not pending
