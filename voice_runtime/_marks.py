"""The consumer's mark waiters: ``send_mark_and_wait`` from any thread, resolved on the loop.

Each waiter is a :class:`concurrent.futures.Future` (a worker thread may block on it, a
coroutine wraps it) keyed by the mark's unique wire name. The ledger
(:class:`~voice_runtime.playback.PlaybackLedger`) decides whether an echoed mark was played
or cleared; this registry only finds and resolves the waiter.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from dataclasses import dataclass

from voice_runtime.playback import MarkStatus, OutboundMark
from voice_runtime.playback import user_mark_name as _user_mark_name

__all__ = ["MarkWaiter", "MarkWaiters"]


@dataclass(eq=False)
class MarkWaiter:
    """One pending ``send_mark_and_wait``: its future and, once queued, its mark."""

    future: concurrent.futures.Future[MarkStatus]
    mark: OutboundMark | None = None

    def resolve(self, status: MarkStatus) -> None:
        """Settle the wait (the first status wins)."""
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            self.future.set_result(status)


class MarkWaiters:
    """Thread-safe registry of the waiters of one session, by unique wire name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_name: dict[str, MarkWaiter] = {}

    def register(self, mark_name: str) -> tuple[str, MarkWaiter]:
        """A new waiter under a fresh ``f"{mark_name}__{8 hex}"`` wire name."""
        with self._lock:
            while (unique := _user_mark_name(mark_name)) in self._by_name:
                pass
            waiter = MarkWaiter(concurrent.futures.Future())
            self._by_name[unique] = waiter
        return unique, waiter

    def get(self, name: str) -> MarkWaiter | None:
        """The waiter of wire name ``name``, if one waits."""
        with self._lock:
            return self._by_name.get(name)

    def forget(self, name: str) -> None:
        """Drop the waiter of ``name`` (its wait is over)."""
        with self._lock:
            self._by_name.pop(name, None)

    def resolve(self, name: str, status: MarkStatus) -> None:
        """Settle the waiter of ``name``, if one waits."""
        waiter = self.get(name)
        if waiter is not None:
            waiter.resolve(status)

    def release_all(self, status: MarkStatus, *, forget: bool = False) -> None:
        """Settle every waiter (the call ended); with ``forget`` also drop them."""
        with self._lock:
            waiters = list(self._by_name.values())
            if forget:
                self._by_name.clear()
        for waiter in waiters:
            waiter.resolve(status)

    def __len__(self) -> int:
        return len(self._by_name)
