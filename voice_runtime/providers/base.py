"""Behaviour every provider shares: the speak() result, playback waits and echo discard."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterable, Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from voice_runtime.session import VoiceSession

logger = logging.getLogger(__name__)

ECHO_TAIL_S = 0.4
MARK_TIMEOUT_S = 30.0

__all__ = ["EchoGate", "SpeakResult", "play_chunks", "play_chunks_async", "words_heard"]


def words_heard(text: str, fraction: float) -> str:
    """The leading words of ``text`` that fit in ``fraction`` of its audio."""
    if fraction >= 1.0:
        return text
    words = text.split()
    n = int(len(words) * max(0.0, fraction))
    return " ".join(words[:n])


class SpeakResult:
    """Builds the result dict of ``speak()`` with the same keys from every provider."""

    def __init__(self, text: str, session: VoiceSession) -> None:
        self.text = text
        self.session = session
        self.start_ms = session.queued_ms
        self.audio_ms = 0.0

    def add_audio(self, nbytes: int) -> None:
        """Count μ-law bytes queued for this utterance."""
        self.audio_ms += nbytes / 8.0

    def heard_ms(self) -> float:
        """How much of this utterance the caller has heard, from mark echoes."""
        heard = self.session.played_ms - self.start_ms
        return max(0.0, min(self.audio_ms, heard))

    def build(
        self,
        *,
        interrupted: bool = False,
        call_disconnected: bool = False,
        error: str | None = None,
    ) -> dict[str, Any]:
        """The result dict."""
        heard = self.heard_ms() if (interrupted or call_disconnected or error) else self.audio_ms
        if interrupted or call_disconnected:
            fraction = heard / self.audio_ms if self.audio_ms else 0.0
            spoken = words_heard(self.text, fraction)
        else:
            spoken = self.text
        result: dict[str, Any] = {
            "last_spoken": spoken,
            "interrupted": interrupted,
            "call_disconnected": call_disconnected,
            "heard_ms": round(heard, 1),
            "audio_ms": round(self.audio_ms, 1),
        }
        if error is not None:
            result["error"] = error
        return result


def _finish(
    result: SpeakResult, session: VoiceSession, stop_event: threading.Event | None, mark_timeout: float
) -> dict[str, Any]:
    if stop_event is not None and stop_event.is_set():
        return result.build(interrupted=True)
    if session.is_disconnected:
        return result.build(call_disconnected=True)
    try:
        played = session.send_mark_and_wait("tts_complete", timeout=mark_timeout)
    except TimeoutError:
        logger.warning("tts_complete mark not echoed in time; audio may have been cut off")
        return result.build()
    if session.is_disconnected:
        return result.build(call_disconnected=True)
    if not played:
        return result.build(interrupted=True)
    return result.build()


def play_chunks(
    text: str,
    session: VoiceSession,
    chunks: Iterable[bytes],
    stop_event: threading.Event | None = None,
    *,
    on_error: Callable[[str], None] | None = None,
    provider: str = "tts",
    mark_timeout: float = MARK_TIMEOUT_S,
) -> dict[str, Any]:
    """Queue μ-law ``chunks`` as they are produced, then wait until the caller heard them.

    Blocking (runs in the consumer's thread). Honours ``stop_event`` between chunks: when it
    is set, the queued audio is cleared and the result says ``interrupted``.
    """
    result = SpeakResult(text, session)
    if session.is_disconnected:
        return result.build(call_disconnected=True)
    t0 = time.monotonic()
    try:
        for chunk in chunks:
            if stop_event is not None and stop_event.is_set():
                session.request_clear_buffer()
                return result.build(interrupted=True)
            if session.is_disconnected:
                return result.build(call_disconnected=True)
            if chunk:
                result.add_audio(len(chunk))
                session.put_outbound_sync(chunk)
    except Exception as exc:
        message = f"{provider} synthesis failed: {exc}"
        logger.warning("synthesis failed", extra={"provider": provider}, exc_info=True)
        if on_error is not None:
            try:
                on_error(message)
            except Exception:
                logger.exception("on_error callback failed")
        return result.build(error=str(exc) or type(exc).__name__)
    logger.debug(
        "synthesis queued", extra={"provider": provider, "seconds": round(time.monotonic() - t0, 3)}
    )
    return _finish(result, session, stop_event, mark_timeout)


async def play_chunks_async(
    text: str,
    session: VoiceSession,
    chunks: AsyncIterable[bytes],
    stop_event: asyncio.Event | threading.Event | None = None,
    *,
    on_error: Callable[[str], None] | None = None,
    provider: str = "tts",
    mark_timeout: float = MARK_TIMEOUT_S,
) -> dict[str, Any]:
    """Async twin of :func:`play_chunks` for providers that synthesise on the event loop."""
    result = SpeakResult(text, session)
    if session.is_disconnected:
        return result.build(call_disconnected=True)
    try:
        async for chunk in chunks:
            if stop_event is not None and stop_event.is_set():
                session.request_clear_buffer()
                return result.build(interrupted=True)
            if session.is_disconnected:
                return result.build(call_disconnected=True)
            if chunk:
                result.add_audio(len(chunk))
                await session.put_outbound(chunk)
    except Exception as exc:
        logger.warning("synthesis failed", extra={"provider": provider}, exc_info=True)
        if on_error is not None:
            try:
                on_error(f"{provider} synthesis failed: {exc}")
            except Exception:
                logger.exception("on_error callback failed")
        return result.build(error=str(exc) or type(exc).__name__)
    if stop_event is not None and stop_event.is_set():
        return result.build(interrupted=True)
    try:
        played = await session.send_mark_and_wait_async("tts_complete", timeout=mark_timeout)
    except TimeoutError:
        return result.build()
    if session.is_disconnected:
        return result.build(call_disconnected=True)
    return result.build(interrupted=not played)


class EchoGate:
    """Echo discard shared by STT providers.

    Committed text that arrives while the agent speaks, or within ``tail_s`` after it stops,
    is echo of our own audio and is dropped; partial text is dropped while speaking.
    """

    def __init__(self, tail_s: float = ECHO_TAIL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.tail_s = tail_s
        self._clock = clock
        self._speaking = False
        self._stopped_at = float("-inf")
        self.discarded = 0

    def set_speaking(self, speaking: bool) -> None:
        """Record whether the agent is speaking now."""
        if self._speaking and not speaking:
            self._stopped_at = self._clock()
        self._speaking = speaking

    @property
    def speaking(self) -> bool:
        """True while the agent speaks."""
        return self._speaking

    def allow_committed(self) -> bool:
        """True when committed text arriving now is the caller's, not our echo."""
        if self._speaking or self._clock() - self._stopped_at < self.tail_s:
            self.discarded += 1
            return False
        return True

    def allow_partial(self) -> bool:
        """True when partial text arriving now should be reported."""
        return not self._speaking
