"""Clocks for the caller simulator: real time, or a virtual clock a test advances."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Protocol

__all__ = ["Clock", "ManualClock", "RealClock"]


class Clock(Protocol):
    """Time source used for pacing and playback."""

    def now(self) -> float:
        """Seconds on this clock."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Return once the clock reads ``deadline`` or later."""
        ...


class RealClock:
    """The running event loop's monotonic clock."""

    def now(self) -> float:
        """Seconds on the loop's clock."""
        return asyncio.get_running_loop().time()

    async def sleep_until(self, deadline: float) -> None:
        """Sleep until the loop's clock reads ``deadline``."""
        delay = deadline - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)


class ManualClock:
    """A virtual clock: time moves only when a test calls :meth:`advance`.

    Makes pacing and playback deterministic: nothing the simulator schedules for later
    happens until the test says so.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        """The virtual time."""
        return self._now

    async def sleep_until(self, deadline: float) -> None:
        """Wait until the virtual time reaches ``deadline``."""
        if deadline <= self._now:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (deadline, next(self._seq), fut))
        await fut

    async def advance(self, seconds: float, step: float = 0.020) -> None:
        """Move time forward in ``step`` increments, letting woken tasks run at each step."""
        target = self._now + seconds
        while self._now < target - 1e-12:
            self._now = min(target, self._now + step)
            while self._sleepers and self._sleepers[0][0] <= self._now + 1e-12:
                _, _, fut = heapq.heappop(self._sleepers)
                if not fut.done():
                    fut.set_result(None)
            # Let woken tasks run, and the network round trips they start settle.
            for _ in range(5):
                await asyncio.sleep(0)

    async def follow(
        self,
        *,
        skip_while: Callable[[], bool] = lambda: False,
        step: float = 0.020,
        speedup: float = 10.0,
    ) -> None:
        """Move with real time until cancelled, ``speedup`` times faster while ``skip_while()``.

        For a call whose other side runs in other threads (the demo): stretches where only
        known audio plays out (``skip_while`` says so) go fast, while waits on work done
        elsewhere (synthesis, recognition, the agent's turn) keep their real length.
        """
        while True:
            await asyncio.sleep(step / speedup if skip_while() else step)
            await self.advance(step, step)
