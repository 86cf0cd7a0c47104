"""MockStt: an STT provider whose transcripts are scripted with :meth:`MockStt.inject`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from voice_runtime.events import TRANSCRIPT_COMMITTED, CallEvents, emit_from
from voice_runtime.providers import Capabilities
from voice_runtime.providers.base import EchoGate

logger = logging.getLogger(__name__)

__all__ = ["MockStt"]


class MockStt:
    """STT provider that commits injected text and records the caller audio it received."""

    capabilities = Capabilities(native_ulaw=True, interim_results=False, needs_network=False)
    #: Where this provider publishes call events (set by the server layer per call).
    call_events: CallEvents | None = None

    def __init__(self, **kwargs: Any) -> None:
        self.on_committed: Callable[[str], None] | None = None
        self.on_recognizing: Callable[[str], None] | None = None
        self.on_error: Callable[[str], None] | None = None
        self.audio = bytearray()  # caller μ-law received, in order
        self.frames = 0
        self.committed: list[str] = []
        self.started = False
        self.stopped = False
        self._echo = EchoGate()
        self._kwargs = kwargs
        self._lock = threading.Lock()
        self._backlog: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def inject(self, text: str) -> None:
        """Commit ``text`` as if the caller had said it (thread-safe)."""
        with self._lock:
            loop = self._loop
            if loop is None:
                self._backlog.append(text)
                return
        try:
            loop.call_soon_threadsafe(self._commit, text)
        except RuntimeError:
            logger.warning("MockStt.inject after its loop closed; text dropped")

    def inject_partial(self, text: str) -> None:
        """Report ``text`` as interim (partial) text, as streaming STTs do (thread-safe).

        Dropped while the agent speaks, like every provider's partials.
        """
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._partial, text)
        except RuntimeError:
            logger.warning("MockStt.inject_partial after its loop closed; text dropped")

    def _partial(self, text: str) -> None:
        if self.on_recognizing is not None and self._echo.allow_partial():
            self.on_recognizing(text)

    def _commit(self, text: str) -> None:
        if not self._echo.allow_committed():
            return
        self.committed.append(text)
        emit_from(self, TRANSCRIPT_COMMITTED, vendor="mock", text=text)
        if self.on_committed is not None:
            self.on_committed(text)

    def set_speaking(self, speaking: bool) -> None:
        """Echo discard, as every provider does."""
        self._echo.set_speaking(speaking)

    async def start(self, inbound_queue: asyncio.Queue[bytes | None]) -> None:
        """Start reading caller audio; returns at once."""
        with self._lock:
            self._loop = asyncio.get_running_loop()
            backlog, self._backlog = self._backlog, []
        self.started = True
        self._task = asyncio.create_task(self._consume(inbound_queue), name="mock-stt")
        for text in backlog:
            self._commit(text)

    async def _consume(self, queue: asyncio.Queue[bytes | None]) -> None:
        while True:
            frame = await queue.get()
            if frame is None:
                return
            self.frames += 1
            self.audio.extend(frame)

    async def stop(self) -> None:
        """Stop reading; idempotent."""
        self.stopped = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
