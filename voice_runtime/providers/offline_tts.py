"""OfflineTts: eSpeak NG or piper speech streamed to the call, with no key and no network.

``speak_async`` is the core: the engine computes the audio in a synthesis thread of its own
(local synthesis is CPU work that must stay off the event loop) which ends with the
synthesis; queueing the audio and waiting until the caller heard it are awaited on the loop,
with no thread held. The blocking ``speak`` runs ``speak_async``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

from voice_runtime._sync import call_on_loop
from voice_runtime.audio import StreamResampler, pcm16_to_ulaw
from voice_runtime.offline import tts_engine
from voice_runtime.providers import Capabilities
from voice_runtime.providers.base import SpeakFromAsync, nothing_to_say, play_chunks_async

if TYPE_CHECKING:
    from voice_runtime.session import VoiceSession

logger = logging.getLogger(__name__)

__all__ = ["OfflineTts"]

#: What a synthesis thread ends its stream with.
_END = None


class OfflineTts(SpeakFromAsync):
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
        """Yield 8 kHz μ-law chunks of ``text`` as the engine produces them (blocking)."""
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

    async def astream_ulaw(self, text: str) -> AsyncIterator[bytes]:
        """Async twin of :meth:`stream_ulaw`: the engine's thread hands chunks to this loop.

        Closing the iterator stops the synthesis at the engine's next chunk.
        """
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        halt = threading.Event()

        def synthesise() -> None:
            end: BaseException | None = _END
            try:
                for chunk in self.stream_ulaw(text, halt):
                    if halt.is_set() or not call_on_loop(loop, chunks.put_nowait, chunk):
                        return
            except Exception as exc:  # handed to the awaiting coroutine
                end = exc
            call_on_loop(loop, chunks.put_nowait, end)

        worker = threading.Thread(target=synthesise, name="offline-tts-synth", daemon=True)
        worker.start()
        try:
            while True:
                item = await chunks.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            halt.set()

    async def speak_async(
        self,
        text: str,
        session: VoiceSession,
        stop_event: threading.Event | None = None,
    ) -> dict[str, Any]:
        """Speak ``text`` on the call and await until the caller heard it."""
        if not text.strip():
            return nothing_to_say(text, session)
        return await play_chunks_async(
            text,
            session,
            self.astream_ulaw(text),
            stop_event,
            on_error=self.on_error,
            provider=f"offline-{self.voice}",
        )
