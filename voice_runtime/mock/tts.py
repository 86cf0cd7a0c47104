"""MockTts: a TTS provider that records the text and plays a soft tone of plausible length."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from voice_runtime._sync import running_loop
from voice_runtime.audio import tone_ulaw
from voice_runtime.providers import Capabilities
from voice_runtime.providers.base import SpeakFromAsync, SpeakResult, play_chunks_async

if TYPE_CHECKING:
    from voice_runtime.session import VoiceSession

logger = logging.getLogger(__name__)

MS_PER_CHAR = 60.0
MIN_MS = 200.0
CHUNK_MS = 100.0

__all__ = ["MockTts"]


class MockTts(SpeakFromAsync):
    """Records spoken text in ``.spoken`` and sends a soft tone (about 60 ms per character)."""

    capabilities = Capabilities(native_ulaw=True, streaming=True, needs_network=False)

    def __init__(
        self,
        on_spoken: Callable[[str], None] | None = None,
        *,
        ms_per_char: float = MS_PER_CHAR,
        freq: float = 440.0,
        **kwargs: Any,
    ) -> None:
        self.on_error: Callable[[str], None] | None = None
        self.on_spoken = on_spoken
        self.spoken: list[str] = []
        self.ms_per_char = ms_per_char
        self.freq = freq
        self._kwargs = kwargs

    def audio_for(self, text: str) -> bytes:
        """The μ-law audio this provider plays for ``text``."""
        ms = max(MIN_MS, len(text) * self.ms_per_char)
        return tone_ulaw(self.freq, ms, level_dbfs=-24.0)

    def _chunks(self, audio: bytes) -> Iterator[bytes]:
        step = int(CHUNK_MS * 8)
        for i in range(0, len(audio), step):
            yield audio[i : i + step]

    async def speak_async(
        self,
        text: str,
        session: VoiceSession,
        stop_event: threading.Event | None = None,
    ) -> dict[str, Any]:
        """Awaitable twin of :meth:`speak`: the same audio and result, no thread."""
        self.spoken.append(text)
        if self.on_spoken is not None:
            try:
                if running_loop() is None:
                    self.on_spoken(text)
                else:
                    # User code (the mock bridge's relay posts over HTTP, maybe to this very
                    # server): never on the loop, where it would stall every call.
                    await asyncio.to_thread(self.on_spoken, text)
            except Exception:
                logger.exception("on_spoken callback failed")
        if session.loop is None:
            # Unit tests without a transport: nothing can play, so report at once.
            result = SpeakResult(text, session)
            return result.build(interrupted=bool(stop_event and stop_event.is_set()))
        return await play_chunks_async(
            text,
            session,
            self._chunks(self.audio_for(text)),
            stop_event,
            on_error=self.on_error,
            provider="mock",
        )
