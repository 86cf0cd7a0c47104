"""How VoiceServer runs a call's handler and drains: the part of the server that owns calls' lives.

VoiceServer inherits :class:`CallLifecycle`; it lives here so server.py stays the place where
routes and admission are wired.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from voice_runtime import calls as _handlers
from voice_runtime._callbacks import is_async_callable as _is_async_callable
from voice_runtime.calls import CallRegistry, HandlerPool
from voice_runtime.events import DRAINING, CallEvent, EventBus
from voice_runtime.logutil import call_log_context, set_call_context
from voice_runtime.providers import TtsProvider
from voice_runtime.providers.base import speak_async
from voice_runtime.session import VoiceSession

# The server's logger: drain lines are the server's, wherever the code lives.
logger = logging.getLogger("voice_runtime.server")


class CallLifecycle:
    """Runs ``on_call`` per call (task or pool thread), ends calls it leaves up, drains."""

    on_call: Callable[[VoiceSession], Any] | None
    registry: CallRegistry
    events: EventBus
    draining: bool
    drain_timeout: float
    goodbye: str
    goodbye_tts: TtsProvider | None
    error_message: str | None
    error_tts: TtsProvider | None
    _call_tasks: set[asyncio.Task[Any]]
    _pool: HandlerPool

    def _call_started(self, session: VoiceSession) -> None:
        self.registry.started(session)
        if self.on_call is None:
            return
        if _is_async_callable(self.on_call):
            task = asyncio.create_task(self._run_async_handler(session), name="vr-on-call")
            self._call_tasks.add(task)
            task.add_done_callback(self._call_tasks.discard)
        else:
            self._pool.submit(self._run_sync_handler, session)

    async def _run_async_handler(self, session: VoiceSession) -> None:
        assert self.on_call is not None
        set_call_context(session.call_sid, session.stream_sid)
        generation = session.generation
        handler = asyncio.ensure_future(self.on_call(session))
        ended = asyncio.ensure_future(session.wait_until_disconnected_async())
        try:
            await asyncio.wait({handler, ended}, return_when=asyncio.FIRST_COMPLETED)
            if not handler.done():
                # Give the handler a moment to finish its post-call work, then end it.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(handler), 5.0)
            if not handler.done():
                handler.cancel()
            with contextlib.suppress(BaseException):
                await handler
            exc = handler.exception() if handler.done() and not handler.cancelled() else None
            await _handlers.finish_async(session, generation, exc, self._error_speaker())
        finally:
            ended.cancel()
            handler.cancel()

    def _run_sync_handler(self, session: VoiceSession) -> None:
        assert self.on_call is not None
        # A pool thread serves many calls: the context is this call's only while it runs.
        with call_log_context(session.call_sid, session.stream_sid):
            generation = session.generation
            exc: Exception | None = None
            try:
                self.on_call(session)
            except Exception as error:
                exc = error
            _handlers.finish_sync(session, generation, exc, self._error_speaker())

    def _error_speaker(self) -> tuple[str, TtsProvider] | None:
        tts = self.error_tts if self.error_tts is not None else self.goodbye_tts
        return (self.error_message, tts) if self.error_message and tts is not None else None

    # ------------------------------------------------------------------ draining

    async def drain(self, timeout: float | None = None) -> None:
        """Stop taking calls, let live ones finish, then say goodbye and hang up the rest.

        No call is cut mid-sentence: the goodbye is queued behind the audio already queued,
        and each call ends after its last audio's mark. Everything ends within ``timeout``
        (default ``drain_timeout``).
        """
        self.draining = True
        timeout = self.drain_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        goodbye_budget = min(10.0, timeout * 0.4)
        logger.info("draining", extra={"live_calls": self.registry.live_count})
        live = {"live_calls": self.registry.live_count}
        self.events.publish(CallEvent(DRAINING, "", None, time.monotonic(), time.time(), live))
        # Polls a thread-safe counter; 50 ms granularity is plenty for a drain.
        while self.registry.live_count and loop.time() < deadline - goodbye_budget:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        remaining = self.registry.live_sessions()
        if remaining:
            budget = max(0.1, deadline - loop.time() - 0.5)
            await asyncio.gather(
                *(asyncio.wait_for(self._say_goodbye(s), budget) for s in remaining),
                return_exceptions=True,
            )
        while self.registry.live_count and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for session in self.registry.live_sessions():
            session.request_disconnect()
        # Handlers may still be doing their after-call work (saving a transcript): the rest
        # of the budget is theirs, then what is left is cancelled.
        if self._call_tasks:
            await asyncio.wait(set(self._call_tasks), timeout=max(0.0, deadline - loop.time()))
        while self._pool.threads and loop.time() < deadline:  # noqa: ASYNC110 - threads
            await asyncio.sleep(0.05)
        for task in list(self._call_tasks):
            task.cancel()

    async def _say_goodbye(self, session: VoiceSession) -> None:
        if session.is_disconnected:
            return
        if self.goodbye_tts is not None and self.goodbye:
            tts = self.goodbye_tts
            await speak_async(tts, self.goodbye, session)
        session.request_disconnect(after_playback=True)
