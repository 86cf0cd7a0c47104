"""SttTee: run a secondary STT beside the primary on the same caller audio."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from voice_runtime._compat import maybe_await
from voice_runtime._queues import _AudioQueue

logger = logging.getLogger(__name__)

SECONDARY_MAXSIZE = 500  # 10 s of 20 ms frames
# The primary's queue is a hand-off: when the primary lags, the fan-out waits and the audio
# backs up in the session's inbound queue, whose bounds and drop policy apply (an unbounded
# hand-off would let one stalled STT hold a call's audio without limit).
PRIMARY_MAXSIZE = 50  # 1 s of 20 ms frames
PRIMARY_MAX_BYTES = 64 * 1024

__all__ = ["SttTee"]


class SttTee:
    """Fans caller audio out to two STT providers; only the primary's callbacks are exposed.

    Any objects with the provider API will do, test doubles included: a ``start``/``stop``
    that returns no awaitable (a ``MagicMock``'s) is simply called.

    The primary's failures propagate. The secondary's are logged and never disturb the
    primary; its queue is bounded, and frames it cannot take in time are dropped and counted.
    """

    def __init__(
        self, primary: Any, secondary: Any, *, secondary_maxsize: int = SECONDARY_MAXSIZE
    ) -> None:
        self.primary = primary
        self.secondary = secondary
        self.secondary_dropped = 0
        self._secondary_maxsize = secondary_maxsize
        self._primary_queue: asyncio.Queue[bytes | None] | None = None
        self._secondary_queue: asyncio.Queue[bytes | None] | None = None
        self._fanout_task: asyncio.Task[None] | None = None

    @property
    def on_committed(self) -> Callable[[str], None] | None:
        """The primary's on_committed."""
        return self.primary.on_committed

    @on_committed.setter
    def on_committed(self, value: Callable[[str], None] | None) -> None:
        self.primary.on_committed = value

    @property
    def on_recognizing(self) -> Callable[[str], None] | None:
        """The primary's on_recognizing."""
        return self.primary.on_recognizing

    @on_recognizing.setter
    def on_recognizing(self, value: Callable[[str], None] | None) -> None:
        self.primary.on_recognizing = value

    @property
    def on_error(self) -> Callable[[str], None] | None:
        """The primary's on_error."""
        return self.primary.on_error

    @on_error.setter
    def on_error(self, value: Callable[[str], None] | None) -> None:
        self.primary.on_error = value

    def set_speaking(self, speaking: bool) -> None:
        """Tell both providers whether the agent speaks (both need echo discard)."""
        self.primary.set_speaking(speaking)
        try:
            self.secondary.set_speaking(speaking)
        except Exception:
            logger.warning("secondary STT set_speaking failed", exc_info=True)

    async def start(self, inbound_queue: asyncio.Queue[bytes | None]) -> None:
        """Start both providers and the fan-out task; the primary's errors propagate."""
        self._primary_queue = _AudioQueue(PRIMARY_MAXSIZE, PRIMARY_MAX_BYTES)
        self._secondary_queue = asyncio.Queue(self._secondary_maxsize)
        await maybe_await(self.primary.start(self._primary_queue))
        try:
            await maybe_await(self.secondary.start(self._secondary_queue))
        except Exception:
            logger.warning("secondary STT failed to start", exc_info=True)
        self._fanout_task = asyncio.create_task(self._fanout(inbound_queue), name="stt-tee-fanout")

    async def _fanout(self, source: asyncio.Queue[bytes | None]) -> None:
        primary = self._primary_queue
        secondary = self._secondary_queue
        assert primary is not None and secondary is not None
        frame: bytes | None = b""
        try:
            while frame is not None:
                frame = await source.get()
                await primary.put(frame)
                if frame is None:
                    while secondary.full():
                        secondary.get_nowait()
                        self.secondary_dropped += 1
                    secondary.put_nowait(None)
                    break
                try:
                    secondary.put_nowait(frame)
                except asyncio.QueueFull:
                    self.secondary_dropped += 1
                    if self.secondary_dropped % 500 == 1:
                        logger.warning(
                            "secondary STT is not keeping up; frames dropped",
                            extra={"dropped": self.secondary_dropped},
                        )
        finally:
            if frame is not None:
                # Cancelled mid-stream: end both consumers too.
                with contextlib.suppress(asyncio.QueueFull):
                    primary.put_nowait(None)
                with contextlib.suppress(asyncio.QueueFull):
                    secondary.put_nowait(None)

    async def stop(self) -> None:
        """Stop the fan-out and both providers."""
        task, self._fanout_task = self._fanout_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await maybe_await(self.primary.stop())
        finally:
            try:
                await maybe_await(self.secondary.stop())
            except Exception:
                logger.warning("secondary STT failed to stop", exc_info=True)
        if self.secondary_dropped:
            logger.info("SttTee stopped", extra={"secondary_dropped": self.secondary_dropped})
