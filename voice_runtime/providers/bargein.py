"""Barge-in: stop the agent when the caller really starts talking over it.

:class:`BargeIn` watches the caller's audio with its own Silero VAD (8 kHz) and the VAD's
:class:`~voice_runtime.audio.vad.SpeechSegmenter` (its ``SpeechStart`` is the barge-in),
independent of the STT provider in use: it attaches to the session's ``inbound_taps``, so it
sees every caller frame on the event loop thread as the transport delivers it. The VAD runs
only while agent audio is pending (queued, or sent and not yet confirmed played), so a quiet
agent costs nothing.

When speech has lasted ``min_speech_ms`` (so noise, coughs and short backchannels do not cut
the agent off; dips shorter than ``max_gap_ms``, such as stop consonants, do not end it, and
at least half of it must be speech), it

1. sets :attr:`BargeIn.stop_event`, which every provider's ``speak()`` honours,
2. calls ``session.request_clear_buffer()``: the local queue is dropped and Twilio gets a
   ``clear``, so playback stops at once,
3. tells the session's STT that the agent stopped speaking (``set_speaking(False)``), so the
   caller's words are not discarded as echo,
4. calls ``on_barge_in(event)``.

``speak()`` then returns ``interrupted=True`` with ``last_spoken`` = the words the caller
heard, computed from mark echoes. Re-arm before each utterance: ``stop = barge.arm()`` and
pass ``stop`` to ``speak()``, or use :meth:`BargeIn.speak`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from voice_runtime.audio.codec import ulaw_decode
from voice_runtime.audio.vad import SileroVad, SpeechSegmenter, SpeechStart
from voice_runtime.events import BARGE_IN

if TYPE_CHECKING:
    from voice_runtime.session import VoiceSession

logger = logging.getLogger(__name__)

__all__ = ["BargeIn", "BargeInEvent"]


@dataclass(frozen=True, slots=True)
class BargeInEvent:
    """One barge-in: when speech began and when it was confirmed (``time.monotonic()``)."""

    onset: float
    detected: float
    agent_played_ms: float  # how much agent audio the caller had heard by then

    @property
    def latency_ms(self) -> float:
        """Milliseconds from the caller's speech onset to the barge-in."""
        return (self.detected - self.onset) * 1000.0


class BargeIn:
    """Stops the agent's speech when the caller talks over it (see the module doc)."""

    def __init__(
        self,
        session: VoiceSession,
        *,
        min_speech_ms: float = 300.0,
        threshold: float = 0.5,
        max_gap_ms: float = 100.0,
        on_barge_in: Callable[[BargeInEvent], None] | None = None,
        release_stt: bool = True,
        attach: bool = True,
    ) -> None:
        if min_speech_ms < 0:
            raise ValueError("min_speech_ms must be >= 0")
        self.session = session
        self.min_speech_ms = float(min_speech_ms)
        self.threshold = float(threshold)
        self.on_barge_in = on_barge_in
        self.release_stt = release_stt
        self.stop_event = threading.Event()
        self.events: list[BargeInEvent] = []
        # Only SpeechStart matters here: no padding kept, no utterance length cap.
        self._segmenter = SpeechSegmenter(
            SileroVad(8000, threshold),
            min_speech_ms=self.min_speech_ms,
            pad_ms=0,
            max_utterance_ms=None,
            max_gap_ms=max_gap_ms,
            min_speech_ratio=0.5,
        )
        self._active = False
        self._attached = False
        if attach:
            self.attach()

    # ------------------------------------------------------------------ wiring

    def attach(self) -> None:
        """Start watching the session's caller audio (idempotent)."""
        if not self._attached:
            self.session.inbound_taps.append(self.feed)
            self._attached = True

    def close(self) -> None:
        """Stop watching the caller audio."""
        if self._attached:
            self._attached = False
            try:
                self.session.inbound_taps.remove(self.feed)
            except ValueError:
                pass

    def arm(self) -> threading.Event:
        """Clear :attr:`stop_event` for the next utterance and return it (any thread)."""
        self.stop_event.clear()
        return self.stop_event

    def speak(self, tts: Any, text: str) -> dict[str, Any]:
        """``tts.speak(text, session, stop_event)`` with barge-in armed (blocking)."""
        return tts.speak(text, self.session, self.arm())  # type: ignore[no-any-return]

    @property
    def count(self) -> int:
        """How many barge-ins happened."""
        return len(self.events)

    # ------------------------------------------------------------------ audio

    def feed(self, frame: bytes) -> None:
        """Look at one caller μ-law frame (event loop thread; the session calls this)."""
        if not self.session.agent_audio_pending or self.stop_event.is_set():
            if self._active:
                self._reset()
            return
        self._active = True
        now = time.monotonic()
        segmenter = self._segmenter
        for event in segmenter.process(ulaw_decode(frame)):
            if isinstance(event, SpeechStart):
                # Stream time back to the monotonic clock: the frame just fed ends "now".
                self._trigger(now - (segmenter.position - event.start), now)
                return

    def _reset(self) -> None:
        self._active = False
        self._segmenter.reset()

    def _trigger(self, onset: float, detected: float) -> None:
        session = self.session
        event = BargeInEvent(onset, detected, session.played_ms)
        self.events.append(event)
        # The stop first: a speak() between two chunks then sees it before queueing more.
        self.stop_event.set()
        session.request_clear_buffer()
        self._reset()
        port = getattr(session, "port", None)
        if port is not None:
            port.events.emit(
                BARGE_IN,
                t=detected,
                source="vad",
                latency_ms=event.latency_ms,
                agent_played_ms=event.agent_played_ms,
            )
        logger.info(
            "caller barged in",
            extra={"call_sid": session.call_sid, "latency_ms": round(event.latency_ms, 1)},
        )
        stt = session.stt
        if self.release_stt and stt is not None:
            try:
                stt.set_speaking(False)
            except Exception:
                logger.exception("STT set_speaking failed during barge-in")
        if self.on_barge_in is not None:
            try:
                self.on_barge_in(event)
            except Exception:
                logger.exception("on_barge_in callback failed")
