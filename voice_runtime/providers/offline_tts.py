"""OfflineTts: eSpeak NG or piper speech streamed to the call, with no key and no network."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from voice_runtime.audio import StreamResampler, pcm16_to_ulaw
from voice_runtime.offline import tts_engine
from voice_runtime.providers import Capabilities
from voice_runtime.providers.base import SpeakAsyncInThread, play_chunks

if TYPE_CHECKING:
    from voice_runtime.session import VoiceSession

logger = logging.getLogger(__name__)

__all__ = ["OfflineTts"]


class OfflineTts(SpeakAsyncInThread):
    """Local TTS: ``voice="espeak"`` (fast formant voice) or ``"piper"`` (natural voice).

    Audio is resampled to 8 kHz and μ-law encoded chunk by chunk as the engine produces it,
    so the caller hears the first words before the whole sentence is synthesised.
    """

    capabilities = Capabilities(native_ulaw=False, streaming=True, needs_network=False)

    def __init__(self, voice: str = "espeak", **kwargs: Any) -> None:
        self.voice = voice
        self.engine: Any = tts_engine(voice)
        self.on_error: Callable[[str], None] | None = None
        self._kwargs = kwargs

    def stream_ulaw(self, text: str, stop: threading.Event | None = None) -> Iterator[bytes]:
        """Yield 8 kHz μ-law chunks of ``text`` as the engine produces them."""
        resampler: StreamResampler | None = None
        for pcm, rate in self.engine.synthesize_stream(text, stop=stop):
            if resampler is None:
                resampler = StreamResampler(rate, 8000)
            out = resampler.process(pcm)
            if len(out):
                yield pcm16_to_ulaw(out.tobytes())
        if resampler is not None:
            tail = resampler.flush()
            if len(tail):
                yield pcm16_to_ulaw(tail.tobytes())

    def speak(
        self,
        text: str,
        session: VoiceSession,
        stop_event: threading.Event | None = None,
    ) -> dict[str, Any]:
        """Speak ``text`` on the call and wait until the caller heard it."""
        return play_chunks(
            text,
            session,
            self.stream_ulaw(text, stop_event),
            stop_event,
            on_error=self.on_error,
            provider=f"offline-{self.voice}",
        )
