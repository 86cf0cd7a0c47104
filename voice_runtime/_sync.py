"""Small primitives that cross the sync/async boundary safely."""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from voice_runtime.errors import LoopThreadError


def running_loop() -> asyncio.AbstractEventLoop | None:
    """Return the event loop running in this thread, or None."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


logger = logging.getLogger(__name__)

# Per-loop cleanups: pools a provider opened on a server's loop must close on that loop,
# before it ends (a loop has no close hook of its own).
_cleanups: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[int, Callable[[], Awaitable[None]]]
] = weakref.WeakKeyDictionary()
_cleanups_lock = threading.Lock()


def at_loop_shutdown(
    loop: asyncio.AbstractEventLoop, key: object, cleanup: Callable[[], Awaitable[None]]
) -> None:
    """Run ``cleanup()`` on ``loop`` when a server shuts down there (one per ``key``)."""
    with _cleanups_lock:
        _cleanups.setdefault(loop, {})[id(key)] = cleanup


async def run_loop_cleanups() -> None:
    """Run (once) the cleanups registered for the running loop; errors are logged."""
    with _cleanups_lock:
        pending = _cleanups.pop(asyncio.get_running_loop(), {})
    for cleanup in pending.values():
        try:
            await cleanup()
        except Exception:
            logger.warning("a provider's loop cleanup failed", exc_info=True)


def forbid_on_loop(
    loop: asyncio.AbstractEventLoop | None, method: str, twin: str | None = None
) -> None:
    """Raise LoopThreadError when called on ``loop``'s own thread (a blocking wait would hang).

    ``twin`` names the awaitable method to use there instead (the error text shows it).
    """
    if loop is not None and running_loop() is loop:
        raise LoopThreadError(method, twin)


class Flag:
    """A one-way flag that sync threads and coroutines on any loop can wait for.

    ``set()`` may be called from any thread; waiters are woken on their own loops.
    """

    __slots__ = ("_event", "_lock", "_waiters")

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._waiters: list[asyncio.Future[None]] = []

    def is_set(self) -> bool:
        """Return True once the flag was set."""
        return self._event.is_set()

    def set(self) -> None:
        """Set the flag and wake every waiter (thread-safe, idempotent)."""
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            waiters, self._waiters = self._waiters, []
        for fut in waiters:
            _resolve_threadsafe(fut, None)

    def wait(self, timeout: float | None = None) -> bool:
        """Block the calling thread until set; return False on timeout."""
        return self._event.wait(timeout)

    async def wait_async(self, timeout: float | None = None) -> bool:
        """Wait in a coroutine until set; return False on timeout."""
        if self._event.is_set():
            return True
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._event.is_set():
                return True
            self._waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            with self._lock:
                if fut in self._waiters:
                    self._waiters.remove(fut)
            return self._event.is_set()
        return True


def _resolve_threadsafe(fut: asyncio.Future[Any], value: Any) -> None:
    loop = fut.get_loop()

    def _set() -> None:
        if not fut.done():
            fut.set_result(value)

    if running_loop() is loop:
        _set()
        return
    try:
        loop.call_soon_threadsafe(_set)
    except RuntimeError:
        # The waiter's loop is closed: nobody is left to wake.
        pass


def call_on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> bool:
    """Run ``fn(*args)`` on ``loop``: inline when already there, else scheduled.

    Returns False when the loop is closed and the call was not made.
    """
    if running_loop() is loop:
        fn(*args)
        return True
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        return False
    return True


async def cancel_and_wait(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` (except the calling one) and wait until each has ended; clear the list."""
    current = asyncio.current_task()
    others = [t for t in tasks if t is not current]
    for task in others:
        task.cancel()
    for task in others:
        try:
            await task
        except BaseException:  # noqa: S110 - a cancelled or failed task is what we expect here
            pass
    tasks.clear()
