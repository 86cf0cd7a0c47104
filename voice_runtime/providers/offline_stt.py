"""OfflineStt: Silero VAD cuts utterances from 8 kHz caller audio; Whisper tiny.en transcribes.

End of turn: an utterance whose text reads as unfinished (a trailing "and", a number being
read out; see :func:`voice_runtime.turns.looks_unfinished`) is held until the caller goes on
(both parts are transcribed together) or ``end_of_turn.unfinished_silence_ms`` of silence
passed; a finished one commits after ``min_silence_ms`` as before. With
``end_of_turn=EndOfTurn(prosody=True)`` an utterance whose pitch ends on a continuation rise is
held the same way (see :func:`voice_runtime.turns.ends_with_rise`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from voice_runtime.audio import resample, ulaw_decode
from voice_runtime.audio.vad import SileroVad, SpeechSegmenter, SpeechStart, UtteranceEnd
from voice_runtime.events import (
    CALLER_SPEECH_ENDED,
    CALLER_SPEECH_STARTED,
    ERROR,
    TRANSCRIPT_COMMITTED,
    CallEvents,
    emit_from,
)
from voice_runtime.providers import Capabilities
from voice_runtime.providers.base import EchoGate
from voice_runtime.turns import EndOfTurn, TurnJoiner

logger = logging.getLogger(__name__)

# One transcription at a time per process: Whisper already uses every core it is given.
_TRANSCRIBE_LOCK = threading.Lock()

__all__ = ["OfflineStt"]


class OfflineStt:
    """Local STT with no key and no network.

    ``on_recognizing("")`` fires when speech starts (there is no partial text);
    ``on_committed(text)`` fires per utterance, transcribed off the event loop.
    """

    capabilities = Capabilities(native_ulaw=False, interim_results=False, needs_network=False)
    #: Where this provider publishes call events (set by the server layer per call).
    call_events: CallEvents | None = None

    def __init__(
        self,
        *,
        min_speech_ms: int = 250,
        min_silence_ms: int = 500,
        threshold: float = 0.5,
        end_of_turn: EndOfTurn | None | bool = True,
        **kwargs: Any,
    ) -> None:
        from voice_runtime.offline.whisper import WhisperEngine

        self.on_committed: Callable[[str], None] | None = None
        self.on_recognizing: Callable[[str], None] | None = None
        self.on_error: Callable[[str], None] | None = None
        self.committed: list[str] = []
        self._whisper = WhisperEngine()
        self._segmenter = SpeechSegmenter(
            SileroVad(8000, threshold), min_speech_ms=min_speech_ms, min_silence_ms=min_silence_ms
        )
        self._echo = EchoGate()
        if end_of_turn is True:
            end_of_turn = EndOfTurn(silence_ms=float(min_silence_ms))
        #: Joins utterances into turns; ``end_of_turn=None`` (or False) commits each at once.
        self.turns = TurnJoiner(end_of_turn or None)
        self._utterances: asyncio.Queue[UtteranceEnd | float | None] = asyncio.Queue()
        self._due = -1.0  # the held-turn deadline already handed to the worker
        self._last_start = -1.0  # stream seconds of the latest speech onset
        self._last_frame_at = time.monotonic()
        self._ended = False  # the caller's audio ended: nothing more is held back
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._kwargs = kwargs

    def set_speaking(self, speaking: bool) -> None:
        """Echo discard, as every provider does."""
        self._echo.set_speaking(speaking)

    async def start(self, inbound_queue: asyncio.Queue[bytes | None]) -> None:
        """Start listening; returns at once."""
        self._task = asyncio.create_task(self._listen(inbound_queue), name="offline-stt")
        worker = asyncio.create_task(self._turn_worker(), name="offline-stt-turns")
        self._pending.add(worker)
        worker.add_done_callback(self._pending.discard)

    async def _listen(self, queue: asyncio.Queue[bytes | None]) -> None:
        segmenter = self._segmenter
        turns = self.turns
        try:
            while True:
                frame = await queue.get()
                self._last_frame_at = time.monotonic()
                if frame is None:
                    events = segmenter.flush()
                else:
                    events = segmenter.process(ulaw_decode(frame))
                for event in events:
                    if isinstance(event, SpeechStart):
                        self._last_start = event.start
                        turns.speech_started()
                        emit_from(self, CALLER_SPEECH_STARTED, source="stt")
                        if self.on_recognizing is not None and self._echo.allow_partial():
                            self.on_recognizing("")
                    elif isinstance(event, UtteranceEnd):
                        # The segmenter says so after its silence window: date the event
                        # back to when the speech ended.
                        lag = max(0.0, segmenter.position - event.end)
                        emit_from(
                            self,
                            CALLER_SPEECH_ENDED,
                            t=time.monotonic() - lag,
                            source="stt",
                            speech_ms=(event.end - event.start) * 1000.0,
                        )
                        self._utterances.put_nowait(event)
                if frame is None:
                    return
                deadline = turns.deadline
                if (
                    deadline is not None
                    and deadline != self._due
                    and not segmenter.in_speech
                    and not segmenter.speech_pending
                    and segmenter.position >= deadline
                ):
                    # Decided now, on the stream clock; the worker commits it when it can.
                    self._due = deadline
                    self._utterances.put_nowait(deadline)
        finally:
            self._ended = True
            self._utterances.put_nowait(None)

    async def _turn_worker(self) -> None:
        """Transcribe utterances in order; commit each turn once it is over (see TurnJoiner)."""
        turns = self.turns
        wall_wait = None if turns.policy is None else turns.policy.unfinished_silence_ms / 1000
        while True:
            if turns.holding and wall_wait is not None:
                # Frames normally keep the stream clock going; if they stop, the wall clock
                # still ends a held turn.
                try:
                    item = await asyncio.wait_for(self._utterances.get(), wall_wait)
                except TimeoutError:
                    if time.monotonic() - self._last_frame_at >= wall_wait:
                        self._commit(turns.flush())
                    continue
            else:
                item = await self._utterances.get()
            if item is None:  # the caller's audio ended
                self._commit(turns.flush())
                if self._utterances.empty():
                    return
                continue
            if isinstance(item, float):  # a held turn's silence ran out
                if turns.deadline == item:
                    self._commit(turns.flush())
                continue
            audio = turns.audio_for(item.pcm)
            try:
                text = await asyncio.to_thread(self._transcribe_blocking, audio, item.sample_rate)
            except Exception as exc:
                logger.warning("offline transcription failed", exc_info=True)
                emit_from(self, ERROR, vendor="offline", role="stt", reason="transcribe_failed")
                if self.on_error is not None:
                    self.on_error(f"offline STT failed: {exc}")
                self._commit(turns.flush())  # what was held had been transcribed already
                continue
            now = turns.transcribed(audio, text.strip(), item.end, item.sample_rate)
            deadline = turns.deadline
            if now is None and deadline is not None:
                # Held. Audio went on while we transcribed: decide on the stream clock.
                if self._last_start > item.end:  # the caller spoke again
                    if self._last_start < deadline:
                        turns.speech_started()  # within the wait: the next part joins this
                    else:
                        now = turns.flush()  # after it: that was a new turn
                elif self._ended or self._segmenter.position >= deadline:
                    now = turns.flush()
            self._commit(now)

    def _commit(self, text: str | None) -> None:
        text = (text or "").strip()
        if not text or not self._echo.allow_committed():
            return
        self.committed.append(text)
        emit_from(self, TRANSCRIPT_COMMITTED, vendor="offline", text=text)
        if self.on_committed is not None:
            self.on_committed(text)

    def _transcribe_blocking(self, pcm: np.ndarray, rate: int) -> str:
        audio16k = resample(pcm, rate, 16000)
        with _TRANSCRIBE_LOCK:
            return self._whisper.transcribe(audio16k)

    async def stop(self) -> None:
        """Stop listening and wait for transcriptions in flight."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._ended = True
        self._utterances.put_nowait(None)
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=5.0)
        for pending in list(self._pending):
            pending.cancel()
