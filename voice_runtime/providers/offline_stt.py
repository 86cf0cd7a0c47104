"""OfflineStt: Silero VAD cuts utterances from 8 kHz caller audio; Whisper tiny.en transcribes."""

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
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._kwargs = kwargs

    def set_speaking(self, speaking: bool) -> None:
        """Echo discard, as every provider does."""
        self._echo.set_speaking(speaking)

    async def start(self, inbound_queue: asyncio.Queue[bytes | None]) -> None:
        """Start listening; returns at once."""
        self._task = asyncio.create_task(self._listen(inbound_queue), name="offline-stt")

    async def _listen(self, queue: asyncio.Queue[bytes | None]) -> None:
        segmenter = self._segmenter
        while True:
            frame = await queue.get()
            events = segmenter.flush() if frame is None else segmenter.process(ulaw_decode(frame))
            for event in events:
                if isinstance(event, SpeechStart):
                    emit_from(self, CALLER_SPEECH_STARTED, source="stt")
                    if self.on_recognizing is not None and self._echo.allow_partial():
                        self.on_recognizing("")
                elif isinstance(event, UtteranceEnd):
                    # The segmenter says so after its silence window: date the event back
                    # to when the speech ended.
                    lag = max(0.0, segmenter.position - event.end)
                    emit_from(
                        self,
                        CALLER_SPEECH_ENDED,
                        t=time.monotonic() - lag,
                        source="stt",
                        speech_ms=(event.end - event.start) * 1000.0,
                    )
                    task = asyncio.create_task(self._transcribe(event.pcm, event.sample_rate))
                    self._pending.add(task)
                    task.add_done_callback(self._pending.discard)
            if frame is None:
                return

    async def _transcribe(self, pcm: np.ndarray, rate: int) -> None:
        try:
            text = await asyncio.to_thread(self._transcribe_blocking, pcm, rate)
        except Exception as exc:
            logger.warning("offline transcription failed", exc_info=True)
            emit_from(self, ERROR, vendor="offline", role="stt", reason="transcribe_failed")
            if self.on_error is not None:
                self.on_error(f"offline STT failed: {exc}")
            return
        text = text.strip()
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
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=5.0)
        for pending in list(self._pending):
            pending.cancel()
