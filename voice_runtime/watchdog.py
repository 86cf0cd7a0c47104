"""Event-loop lag watchdog: notices code that blocks the loop every call shares.

All media streams of a server run on one event loop, so one blocking call (a sync SDK call,
``time.sleep``, heavy CPU work in a coroutine) delays the audio of every call. The watchdog
wakes every ``interval`` seconds and measures how late it woke; a lag above ``threshold``
is logged as a warning with the lag in ``extra`` (at most once per ``log_every`` seconds,
with the count of lags not logged since), and counted. A block longer than
``threshold + interval`` is always seen; the default interval of 0.25 s keeps the watchdog's
own wakeups (each costs an idle process 100–200 µs of CPU on a VM) at four a second.

:class:`~voice_runtime.server.VoiceServer` starts one for its lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

__all__ = ["LoopWatchdog"]


class LoopWatchdog:
    """Measures event-loop lag every ``interval`` s and warns when it exceeds ``threshold`` s."""

    def __init__(
        self,
        *,
        interval: float = 0.25,
        threshold: float = 0.25,
        log_every: float = 5.0,
        on_lag: Callable[[float], None] | None = None,
    ) -> None:
        self.interval = interval
        self.threshold = threshold
        self.log_every = log_every
        self.on_lag = on_lag
        self.lag_events = 0  # lags above the threshold so far
        self.max_lag = 0.0  # seconds, the worst lag seen
        self.last_lag = 0.0  # seconds, the latest measurement
        self._task: asyncio.Task[None] | None = None
        self._last_log = float("-inf")
        self._unlogged = 0

    @property
    def running(self) -> bool:
        """True while the watchdog task is alive."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start watching the running loop (loop only; idempotent)."""
        if self.running:
            return
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="voice-runtime-watchdog"
        )

    async def stop(self) -> None:
        """Stop watching and wait for the task to end (loop only)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _run(self) -> None:
        interval = self.interval
        while True:
            started = time.monotonic()
            await asyncio.sleep(interval)
            self.note(time.monotonic() - started - interval)

    def note(self, lag: float) -> None:
        """Record one lag measurement in seconds; warn when it is over the threshold."""
        lag = max(0.0, lag)
        self.last_lag = lag
        if lag > self.max_lag:
            self.max_lag = lag
        if lag <= self.threshold:
            return
        self.lag_events += 1
        if self.on_lag is not None:
            try:
                self.on_lag(lag)
            except Exception:
                logger.exception("on_lag callback failed")
        now = time.monotonic()
        if now - self._last_log < self.log_every:
            self._unlogged += 1
            return
        self._last_log = now
        logger.warning(
            "event loop blocked for %d ms: every call's audio was delayed",
            round(lag * 1000.0),
            extra={
                "lag_ms": round(lag * 1000.0, 1),
                "threshold_ms": round(self.threshold * 1000.0, 1),
                "not_logged_since": self._unlogged,
            },
        )
        self._unlogged = 0
