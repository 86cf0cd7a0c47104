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
2. calls ``session.request_clear_buffer(keep_uninterruptible=True)``: the local queue is
   dropped and Twilio gets a ``clear``, so playback stops at once (unless uninterruptible
   audio is playing: then nothing is cleared, see ``VoiceSession.uninterruptible``),
3. tells the session's STT that the agent stopped speaking (``set_speaking(False)``), so the
   caller's words are not discarded as echo,
4. calls ``on_barge_in(event)``.

``speak()`` then returns ``interrupted=True`` with ``last_spoken`` = the words the caller
heard, computed from mark echoes. Re-arm before each utterance: ``stop = barge.arm()`` and
pass ``stop`` to ``speak()``, or use :meth:`BargeIn.speak`.

False interruptions (``resume_after_ms``): the barge-in first only *pauses* playback (Twilio
``clear``; the unheard rest is kept, see :func:`voice_runtime.turns.pause_playback`). When
words are committed (or ``min_words`` interim words arrive) the interruption is confirmed as
above; when the caller's sound ended and no words came within ``resume_after_ms``, it was
noise or a backchannel and the agent resumes from the unheard point (``on_resume``). The
wait doubles when the caller's words so far read as unfinished, and (``prosody=True``) when
the caller's sound ended on a rising pitch (:func:`voice_runtime.turns.ends_with_rise`).

Word-aware barge-in (``min_words``): speech alone does not interrupt; the caller's transcript
must reach ``min_words`` words first. Interim text (ElevenLabs partials, Azure recognizing)
counts as it arrives; with an STT that has none (offline, mock) the committed text counts.
Transcripts reach the barge-in through :meth:`BargeIn.note_transcript` (``Conversation``
wires it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from voice_runtime._compat import clear_for_barge_in
from voice_runtime.audio.codec import ulaw_decode
from voice_runtime.audio.vad import SileroVad, SpeechSegmenter, SpeechStart, UtteranceEnd
from voice_runtime.events import BARGE_IN
from voice_runtime.turns import (
    PROSODY_DEFAULT,
    SentTail,
    discard_paused,
    ends_with_rise,
    looks_unfinished,
    pause_playback,
    resume_playback,
)

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
        resume_after_ms: float | None = None,
        min_words: int = 0,
        max_resume_bytes: int = 240_000,
        max_pause_ms: float = 6000.0,
        on_resume: Callable[[BargeInEvent], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        prosody: bool = PROSODY_DEFAULT,
    ) -> None:
        if min_speech_ms < 0:
            raise ValueError("min_speech_ms must be >= 0")
        if resume_after_ms is not None and resume_after_ms <= 0:
            raise ValueError("resume_after_ms must be > 0 (None turns resuming off)")
        if min_words < 0 or max_resume_bytes <= 0 or max_pause_ms <= 0:
            raise ValueError("min_words must be >= 0, max_resume_bytes and max_pause_ms > 0")
        #: Wait this long after the caller's sound ended for words before resuming (None: off).
        self.resume_after_ms = resume_after_ms
        #: Interrupt only once the caller's transcript has this many words (0: speech alone).
        self.min_words = int(min_words)
        self.max_resume_bytes = int(max_resume_bytes)
        #: A pause (or a word-aware candidate) this long is decided as an interruption.
        self.max_pause_ms = float(max_pause_ms)
        self.on_resume = on_resume
        #: A caller sound that ended on a rising pitch doubles the wait too.
        self.prosody = bool(prosody)
        self._clock = clock  # injectable so tests can step through the decision windows
        #: Barge-ins that turned out to be noise or a backchannel (playback resumed).
        self.false_interruptions = 0
        # "idle" (watching), "candidate" (speech, waiting for words), "paused" (playback held).
        self._state = "idle"
        self._since = 0.0  # monotonic time the candidate or pause began
        self._onset = 0.0
        self._speech_end: float | None = None  # monotonic time the caller's sound ended
        self._words = 0  # most words seen in one transcript since the candidate or pause
        self._unfinished = False  # the latest transcript reads as an unfinished sentence
        self._rising = False  # the caller's sound ended on a rising pitch
        self._text = ""  # the latest transcript since the candidate or pause
        if resume_after_ms is not None:
            port: Any = getattr(session, "port", None)
            if not hasattr(port, "sent_tail"):
                raise ValueError("resume_after_ms needs a VoiceSession (it pauses its playback)")
            if port.sent_tail is None:
                port.sent_tail = SentTail()
        self.session = session
        self.min_speech_ms = float(min_speech_ms)
        self.threshold = float(threshold)
        self.on_barge_in = on_barge_in
        self.release_stt = release_stt
        self.stop_event = threading.Event()
        self.events: list[BargeInEvent] = []
        # SpeechStart is the barge-in, UtteranceEnd the end of the caller's sound while a
        # barge-in is being decided: no padding kept, no utterance length cap.
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

    def note_transcript(self, text: str, *, final: bool) -> None:
        """The caller's STT produced ``text`` (interim or final); loop thread.

        Confirms a paused barge-in (any final words) or a word-aware candidate (enough words).
        """
        words = len(text.split())
        if self._state == "idle" or words == 0:
            return
        self._words = max(self._words, words)
        self._text = text
        self._unfinished = looks_unfinished(text)
        if self._state == "paused" and (final or self._words >= max(self.min_words, 1)):
            self._confirm()
        elif self._state == "candidate" and self._words >= self.min_words:
            self._trigger(self._onset, self._clock(), confirmed=True)

    @property
    def state(self) -> str:
        """``"idle"`` (watching), ``"candidate"`` (speech, waiting for words) or ``"paused"``."""
        return self._state

    @property
    def paused(self) -> bool:
        """True while playback is held by a barge-in not yet confirmed or dismissed."""
        return self._state == "paused"

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
        if self._state != "idle":
            self._feed_deciding(frame)
            return
        if not self.session.agent_audio_pending or self.stop_event.is_set():
            if self._active:
                self._reset()
            return
        self._active = True
        now = self._clock()
        segmenter = self._segmenter
        for event in segmenter.process(ulaw_decode(frame)):
            if isinstance(event, SpeechStart):
                # Stream time back to the monotonic clock: the frame just fed ends "now".
                onset = now - (segmenter.position - event.start)
                if self.min_words > 0:
                    self._begin("candidate", onset, now)
                else:
                    self._trigger(onset, now)
                return

    def _begin(self, state: str, onset: float, now: float) -> None:
        """Start deciding whether this speech interrupts: a candidate, or a paused playback."""
        self._state = state
        self._since = now
        self._onset = onset
        self._speech_end = None
        self._words = 0
        self._unfinished = False
        self._rising = False
        self._text = ""
        self._release_stt()  # so the caller's words (interim ones too) are not taken for echo

    def _feed_deciding(self, frame: bytes) -> None:
        """A candidate or a pause: follow the caller's speech and decide when it is time."""
        if self._state == "paused" and not self.session.port.paused:
            # The pause ended elsewhere: a clear (a stop, a hang-up) or the session's reset.
            self._state = "idle"
            self._reset()
            return
        now = self._clock()
        for event in self._segmenter.process(ulaw_decode(frame)):
            if isinstance(event, SpeechStart):
                self._speech_end = None
                self._rising = False
            elif isinstance(event, UtteranceEnd):
                self._speech_end = now
                if self.prosody:
                    # No words yet reads as "some sound": the pitch alone decides.
                    self._rising = ends_with_rise(self._text or "...", event.pcm, event.sample_rate)
        if self._state == "candidate" and not self.session.agent_audio_pending:
            self._dismiss()  # the agent finished: this speech is the caller's next turn
            return
        if self.stop_event.is_set():  # someone else stopped the utterance meanwhile
            if self._state == "paused":
                self._confirm()
            else:
                self._dismiss()
            return
        if now - self._since >= self.max_pause_ms / 1000.0:
            # Sound that long is someone talking, even if no words came (yet).
            if self._state == "paused":
                self._confirm()
            else:
                self._trigger(self._onset, now, confirmed=True)
            return
        end = self._speech_end
        wait_ms = self.resume_after_ms if self.resume_after_ms is not None else 800.0
        if self._unfinished or self._rising:
            wait_ms *= 2.0  # "wait, and..." or a rising pause: the caller is not done yet
        if end is None or now - end < wait_ms / 1000.0:
            return
        if self._state == "paused":
            self._resume()
        else:
            self._dismiss()

    def _dismiss(self) -> None:
        """A word-aware candidate that never had enough words: the agent goes on."""
        self._state = "idle"
        self._reset()
        if self.session.agent_audio_pending:
            self._hold_stt()

    def _resume(self) -> None:
        """No words came: it was noise or a backchannel; play on from the unheard point."""
        session = self.session
        event = BargeInEvent(self._onset, self._clock(), session.played_ms)
        self._state = "idle"
        self._reset()
        self.false_interruptions += 1
        resume_playback(session)
        self._hold_stt()
        logger.info(
            "barge-in was a false interruption; playback resumed",
            extra={"call_sid": session.call_sid, "played_ms": round(event.agent_played_ms)},
        )
        if self.on_resume is not None:
            try:
                self.on_resume(event)
            except Exception:
                logger.exception("on_resume callback failed")

    def _confirm(self) -> None:
        """Words came: the paused barge-in is a real interruption."""
        self._state = "idle"
        self._finish(self._onset, self._clock())
        discard_paused(self.session)

    def _release_stt(self) -> None:
        stt = self.session.stt
        if self.release_stt and stt is not None:
            try:
                stt.set_speaking(False)
            except Exception:
                logger.exception("STT set_speaking failed during barge-in")

    def _hold_stt(self) -> None:
        """The agent speaks on: its echo must be discarded again."""
        stt = self.session.stt
        if self.release_stt and stt is not None and not self.stop_event.is_set():
            try:
                stt.set_speaking(True)
            except Exception:
                logger.exception("STT set_speaking failed after a false barge-in")

    def _reset(self) -> None:
        self._active = False
        self._segmenter.reset()

    def _trigger(self, onset: float, detected: float, *, confirmed: bool = False) -> None:
        if self.resume_after_ms is not None and not confirmed:
            self._state = "idle"
            if pause_playback(self.session, self.max_resume_bytes):
                self._begin("paused", onset, detected)
                logger.info(
                    "caller barged in; playback paused", extra={"call_sid": self.session.call_sid}
                )
                return
        self._state = "idle"
        self._finish(onset, detected)

    def _finish(self, onset: float, detected: float) -> None:
        session = self.session
        event = BargeInEvent(onset, detected, session.played_ms)
        self.events.append(event)
        # The stop first: a speak() between two chunks then sees it before queueing more.
        self.stop_event.set()
        clear_for_barge_in(session)
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
        self._release_stt()
        if self.on_barge_in is not None:
            try:
                self.on_barge_in(event)
            except Exception:
                logger.exception("on_barge_in callback failed")
