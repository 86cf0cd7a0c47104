"""Conversation: the say/listen/hang-up loop most call scripts need, on one session.

It wires the session's STT (whenever the transport builds it) to a transcript queue and
keeps the STT's echo discard in step with the agent's speech. Sync methods run in the
consumer's thread; ``say_async`` / ``listen_async`` / ``hangup_async`` are their twins for an
``async def`` handler. Both raise :class:`~voice_runtime.errors.CallHangupError` when the call
ends while they wait.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from voice_runtime._compat import is_voice_session
from voice_runtime.errors import CallHangupError, ConfigurationError
from voice_runtime.providers import SttProvider, TtsProvider
from voice_runtime.providers.base import speak_async
from voice_runtime.session import VoiceSession

logger = logging.getLogger(__name__)

LISTEN_POLL_S = 0.02  # how often listen_async looks for a transcript (no thread is held)

__all__ = ["Conversation", "Turn"]


@dataclass(frozen=True)
class Turn:
    """One thing said on the call; ``t`` is ``time.monotonic()`` when it was final."""

    speaker: str
    text: str
    t: float


class Conversation:
    """Say and listen on a call with any TTS and STT provider."""

    def __init__(
        self,
        session: VoiceSession,
        tts: TtsProvider,
        *,
        on_turn: Callable[[Turn], None] | None = None,
        barge_in: bool | Any = False,
    ) -> None:
        self.session = session
        self.tts = tts
        self.on_turn = on_turn
        self.turns: list[Turn] = []
        self.stop_event = threading.Event()
        # barge_in=True watches the caller with a Silero VAD (offline extra) and stops the
        # agent when the caller talks over it; a configured BargeIn object may be passed too.
        self.barge_in: Any = None
        if barge_in is True:
            from voice_runtime.providers.bargein import BargeIn

            self.barge_in = BargeIn(session)
        elif barge_in:
            self.barge_in = barge_in
        self._heard: queue.Queue[str | None] = queue.Queue()
        self._stt: SttProvider | None = None
        previous_ready = session.on_stt_ready
        previous_disc = session.on_disconnected

        def on_stt_ready(stt: SttProvider) -> None:
            self._attach(stt)
            if previous_ready is not None:
                previous_ready(stt)

        def on_disconnected() -> None:
            self._heard.put(None)
            if previous_disc is not None:
                previous_disc()

        session.on_stt_ready = on_stt_ready
        session.on_disconnected = on_disconnected
        if session.stt is not None:
            self._attach(session.stt)

    def _attach(self, stt: SttProvider) -> None:
        self._stt = stt
        stt.on_committed = self._committed
        if hasattr(self.barge_in, "note_transcript"):
            # Word-aware barge-in and false-interruption checks read the caller's interim words.
            previous = stt.on_recognizing

            def on_recognizing(text: str) -> None:
                self.barge_in.note_transcript(text, final=False)
                if previous is not None:
                    previous(text)

            stt.on_recognizing = on_recognizing

    def _committed(self, text: str) -> None:
        text = text.strip()
        if text:
            if hasattr(self.barge_in, "note_transcript"):
                self.barge_in.note_transcript(text, final=True)
            self._heard.put(text)

    def _record(self, speaker: str, text: str) -> None:
        turn = Turn(speaker, text, time.monotonic())
        self.turns.append(turn)
        if self.on_turn is not None:
            try:
                self.on_turn(turn)
            except Exception:
                logger.exception("on_turn callback failed")

    def _before_say(self) -> SttProvider | None:
        if self.session.is_disconnected:
            raise CallHangupError()
        if self.barge_in is not None:
            self.stop_event = self.barge_in.arm()
        else:
            self.stop_event.clear()
        stt = self._stt
        if stt is not None:
            stt.set_speaking(True)
        return stt

    def say(self, text: str) -> dict[str, Any]:
        """Speak and return when the caller heard it, or was interrupted (the TTS result dict)."""
        stt = self._before_say()
        try:
            result = self.tts.speak(text, self.session, self.stop_event)
        finally:
            if stt is not None:
                stt.set_speaking(False)
        self._record("agent", result.get("last_spoken", text))
        return result

    async def say_async(self, text: str) -> dict[str, Any]:
        """Awaitable twin of :meth:`say` for ``async def`` handlers (the loop keeps running)."""
        stt = self._before_say()
        try:
            result = await speak_async(self.tts, text, self.session, self.stop_event)
        finally:
            if stt is not None:
                stt.set_speaking(False)
        self._record("agent", result.get("last_spoken", text))
        return result

    def _require_stt(self) -> None:
        """Fail at once when nothing can ever be heard (instead of after the timeout)."""
        session = self.session
        if (
            self._stt is None
            and getattr(session, "stt", None) is None
            and getattr(session, "stt_factory", None) is None
        ):
            raise ConfigurationError(
                "listen() needs speech recognition, and this call has none: pass stt= to "
                "VoiceServer (for example VoiceServer(stt='offline')) or set "
                "session.stt_factory"
            )

    def listen(self, timeout: float = 15.0) -> str | None:
        """Return the caller's next utterance, or None when nothing was said in time.

        Raises :class:`~voice_runtime.errors.ConfigurationError` at once when the call has
        no STT.
        """
        self._require_stt()
        deadline = time.monotonic() + timeout
        while True:
            if self.session.is_disconnected and self._heard.empty():
                raise CallHangupError()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                text = self._heard.get(timeout=min(remaining, 0.25))
            except queue.Empty:
                continue
            if text is None:
                raise CallHangupError()
            self._record("caller", text)
            return text

    def hangup(self) -> None:
        """End the call once everything said has been heard."""
        if is_voice_session(self.session):
            self.session.request_disconnect(after_playback=True)
        else:
            self.session.request_disconnect()  # the 0.1.x call, for other session objects

    async def listen_async(self, timeout: float = 15.0) -> str | None:
        """Awaitable twin of :meth:`listen` for ``async def`` handlers."""
        self._require_stt()
        deadline = time.monotonic() + timeout
        while True:
            try:
                text = self._heard.get_nowait()
            except queue.Empty:
                if self.session.is_disconnected:
                    raise CallHangupError() from None
                if time.monotonic() >= deadline:
                    return None
                await asyncio.sleep(LISTEN_POLL_S)
                continue
            if text is None:
                raise CallHangupError()
            self._record("caller", text)
            return text

    async def hangup_async(self) -> None:
        """Awaitable twin of :meth:`hangup` (it never blocks; this keeps handlers uniform)."""
        self.hangup()
