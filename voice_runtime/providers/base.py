"""Shared provider behaviour: speak() results and playback waits.

Async is the core: every built-in TTS implements ``speak_async`` on top of
:func:`play_chunks_async`, and its blocking ``speak`` runs that coroutine through
:func:`speak_sync` (on the session's loop, or a private one for a mock session).

The STT half (echo discard, reconnects) lives in :mod:`voice_runtime.providers.stt_base`;
its names stay importable from here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from voice_runtime._compat import is_voice_session, number
from voice_runtime._sync import forbid_on_loop, running_loop
from voice_runtime.events import ERROR
from voice_runtime.playback import Segment
from voice_runtime.providers.stt_base import (
    ECHO_TAIL_S,
    HEALTHY_AFTER_S,
    CallerAudioBuffer,
    EchoGate,
    EndKind,
    ReconnectingStt,
    backoff_delay,
)

if TYPE_CHECKING:
    from voice_runtime.session import VoiceSession

logger = logging.getLogger(__name__)

MARK_TIMEOUT_S = 30.0
STOP_POLL_S = 0.02  # how often speak() looks at stop_event while the caller listens
LOOP_CHECK_S = 0.5  # how often a blocking speak() checks that the session's loop still exists

_T = TypeVar("_T")

#: How ``on_error`` names a failed synthesis, as the 0.1.x providers did
#: (``elevenlabs_tts_failed: …``); other providers follow the same pattern.
_ERROR_LABELS = {"azure": "azure_synthesis_failed"}

__all__ = [
    "ECHO_TAIL_S",
    "HEALTHY_AFTER_S",
    "CallerAudioBuffer",
    "EndKind",
    "EchoGate",
    "ReconnectingStt",
    "SpeakResult",
    "backoff_delay",
    "nothing_to_say",
    "play_chunks",
    "play_chunks_async",
    "run_private",
    "speak_async",
    "speak_in_thread",
    "speak_sync",
    "SpeakFromAsync",
    "words_heard",
]


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
        # None: the session cannot say what was played (a mock or another duck type).
        self.start_ms = number(getattr(session, "queued_ms", None))
        self.audio_ms = 0.0

    def add_audio(self, nbytes: int) -> None:
        """Count μ-law bytes queued for this utterance."""
        self.audio_ms += nbytes / 8.0

    def segment(self, *, interrupted: bool = False) -> Segment:
        """This utterance on the playback axis, heard as far as mark echoes say.

        A session that reports no playback position counts what was sent, as 0.1.x did.
        """
        played = number(getattr(self.session, "played_ms", None))
        if played is None or self.start_ms is None:
            return Segment(self.start_ms or 0.0, self.audio_ms, self.audio_ms, interrupted)
        return Segment.at(self.start_ms, self.audio_ms, played, interrupted=interrupted)

    def heard_ms(self) -> float:
        """How much of this utterance the caller has heard, from mark echoes."""
        return self.segment().heard_ms

    def build(
        self,
        *,
        interrupted: bool = False,
        call_disconnected: bool = False,
        error: str | None = None,
    ) -> dict[str, Any]:
        """The result dict."""
        if interrupted or call_disconnected or error:
            seg = self.segment(interrupted=interrupted)
        else:
            seg = Segment(self.start_ms or 0.0, self.audio_ms, self.audio_ms)
        if interrupted or call_disconnected:
            spoken = words_heard(self.text, seg.heard_fraction)
        else:
            spoken = self.text
        result: dict[str, Any] = {
            "last_spoken": spoken,
            "interrupted": interrupted,
            "call_disconnected": call_disconnected,
            "heard_ms": round(seg.heard_ms, 1),
            "audio_ms": round(seg.audio_ms, 1),
        }
        if error is not None:
            result["error"] = error
        return result


def nothing_to_say(text: str, session: VoiceSession) -> dict[str, Any]:
    """The result of ``speak()`` for empty text: returned at once, no audio and no mark."""
    return SpeakResult(text, session).build()


async def play_chunks_async(
    text: str,
    session: VoiceSession,
    chunks: AsyncIterable[bytes] | Iterable[bytes],
    stop_event: threading.Event | None = None,
    *,
    on_error: Callable[[str], None] | None = None,
    provider: str = "tts",
    mark_timeout: float = MARK_TIMEOUT_S,
) -> dict[str, Any]:
    """Queue μ-law ``chunks`` as they are produced, then wait until the caller heard them.

    The core of every built-in ``speak_async``: it awaits, it never blocks the loop it runs
    on (the session's, or a private one of a sync ``speak``). Honours ``stop_event`` between
    chunks and while the caller listens: the queued audio is cleared and the result says
    ``interrupted``. Cancelling the awaiting task clears the queued audio too.

    A session that is not a VoiceSession (a 0.1.x test's MagicMock) gets exactly the 0.1.x
    calls: ``put_outbound_sync`` and ``tap_agent`` per chunk, then one blocking
    ``send_mark_and_wait("tts_complete", timeout=...)``.
    """
    real = is_voice_session(session)
    result = SpeakResult(text, session)
    if session.is_disconnected:
        _close_sync(chunks)
        return result.build(call_disconnected=True)
    t0 = time.monotonic()
    source = _aiter(chunks)  # closed below, which closes a vendor stream at once
    try:
        async for chunk in source:
            if stop_event is not None and stop_event.is_set():
                if real:
                    session.request_clear_buffer()
                return result.build(interrupted=True)
            if real and session.is_disconnected:
                return result.build(call_disconnected=True)
            if chunk:
                result.add_audio(len(chunk))
                session.put_outbound_sync(chunk)
                if not real:
                    session.tap_agent(chunk)
    except asyncio.CancelledError:
        if real:
            session.request_clear_buffer()  # a cancelled speech must not go on playing
        raise
    except Exception as exc:
        return _report_error(result, exc, on_error, provider)
    finally:
        await _aclose(source)
    logger.debug(
        "synthesis queued", extra={"provider": provider, "seconds": round(time.monotonic() - t0, 3)}
    )
    if not real:
        try:
            session.send_mark_and_wait("tts_complete", timeout=mark_timeout)
        except TimeoutError:
            logger.warning("tts_complete mark not echoed in time; audio may have been cut off")
        return result.build()
    try:
        return await _finish(result, session, stop_event, mark_timeout)
    except asyncio.CancelledError:
        session.request_clear_buffer()
        raise


def _aiter(chunks: AsyncIterable[bytes] | Iterable[bytes]) -> AsyncIterator[bytes]:
    """Chunks as an async iterator (a sync one is a test double's or an SDK stand-in's)."""
    if isinstance(chunks, AsyncIterator):
        return chunks
    if isinstance(chunks, AsyncIterable):
        return aiter(chunks)
    return _from_sync(chunks)


async def _from_sync(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    try:
        for chunk in chunks:
            yield chunk
    finally:
        _close_sync(chunks)


def _close_sync(chunks: object) -> None:
    close = getattr(chunks, "close", None)
    if callable(close) and not isinstance(chunks, AsyncIterable):
        close()


async def _aclose(source: AsyncIterator[bytes]) -> None:
    aclose = getattr(source, "aclose", None)
    if aclose is not None:
        await aclose()


async def _finish(
    result: SpeakResult,
    session: VoiceSession,
    stop_event: threading.Event | None,
    mark_timeout: float,
) -> dict[str, Any]:
    if stop_event is not None and stop_event.is_set():
        # A chunk queued while the stop was being set may have slipped past a clear.
        session.request_clear_buffer()
        return result.build(interrupted=True)
    if session.is_disconnected:
        return result.build(call_disconnected=True)
    try:
        played = await _wait_heard(session, stop_event, mark_timeout)
    except TimeoutError:
        logger.warning("tts_complete mark not echoed in time; audio may have been cut off")
        return result.build()
    if session.is_disconnected:
        return result.build(call_disconnected=True)
    if not played or (stop_event is not None and stop_event.is_set()):
        return result.build(interrupted=True)
    return result.build()


async def _wait_heard(
    session: VoiceSession, stop_event: threading.Event | None, timeout: float
) -> bool:
    """Await the ``tts_complete`` mark; a stop_event set meanwhile clears the audio.

    Synthesis usually runs ahead of playback, so most of an utterance is queued before the
    stop comes: the stop must cut the playback, not only the synthesis. The mark is waited
    for on the session's loop; from a private loop (a sync ``speak`` with no session loop
    running) the wait hops over thread-safely.
    """
    loop = session.loop
    if loop is None:
        # No transport yet: the blocking call raises its clear NoEventLoopError.
        return session.send_mark_and_wait("tts_complete", timeout=timeout)
    coro = session.send_mark_and_wait_async("tts_complete", timeout)
    waiter: asyncio.Future[bool]
    if loop is asyncio.get_running_loop():
        waiter = asyncio.ensure_future(coro)
    else:
        try:
            waiter = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))
        except RuntimeError:  # the session's loop is closed: the call is over
            coro.close()
            return False
    cleared = False
    try:
        if stop_event is None:
            return await waiter
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=STOP_POLL_S)
            if done:
                return waiter.result()
            if not cleared and stop_event.is_set():
                cleared = True
                session.request_clear_buffer()  # resolves the mark as cleared
    finally:
        if not waiter.done():
            waiter.cancel()


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
    """Blocking :func:`play_chunks_async` for a sync chunk source (a provider's own thread).

    Runs on a private loop in the calling thread, so a blocking ``chunks`` iterator blocks
    only that thread, never the session's loop.
    """
    coro = play_chunks_async(
        text,
        session,
        chunks,
        stop_event,
        on_error=on_error,
        provider=provider,
        mark_timeout=mark_timeout,
    )
    return run_private(coro)


def run_private(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` to the end on a private event loop and return its result (blocking).

    A thread that already runs a loop (not the session's: that one is refused earlier) gets
    the private loop in a helper thread, so a sync call keeps working there as in 0.1.x.
    """
    if running_loop() is None:
        return _run_on_new_loop(coro)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vr-private-loop") as pool:
        return pool.submit(_run_on_new_loop, coro).result()


def _run_on_new_loop(coro: Coroutine[Any, Any, _T]) -> _T:
    # A loop factory keeps the thread's current event loop as it was (asyncio.run would
    # reset it to None, breaking a 0.1.x test that calls get_event_loop() afterwards).
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        return runner.run(coro)


def speak_sync(
    speak: Callable[[], Coroutine[Any, Any, dict[str, Any]]],
    session: VoiceSession,
    method: str,
) -> dict[str, Any]:
    """Run a provider's ``speak_async`` for its blocking ``speak`` (the consumer's thread).

    ``speak`` makes the coroutine. With a VoiceSession whose loop runs, it runs there (one
    loop, so a vendor client and its connection pool serve every speak); otherwise (a mock
    session, no transport yet) on a private loop in this thread. ``method`` names the
    provider's ``speak`` in the LoopThreadError raised on the session's loop thread.
    """
    loop = session.loop if is_voice_session(session) else None
    forbid_on_loop(loop, method, method + "_async")
    if loop is None or loop.is_closed() or not loop.is_running():
        return run_private(speak())
    coro = speak()
    try:
        fut = asyncio.run_coroutine_threadsafe(coro, loop)
    except RuntimeError:  # closed meanwhile: the call is over
        coro.close()
        return SpeakResult("", session).build(call_disconnected=True)
    while True:
        try:
            return fut.result(timeout=LOOP_CHECK_S)
        except concurrent.futures.TimeoutError:
            if loop.is_closed() or not loop.is_running():  # it will never finish the speech
                fut.cancel()
                return SpeakResult("", session).build(call_disconnected=True)
        except concurrent.futures.CancelledError:
            return SpeakResult("", session).build(call_disconnected=True)


def _report_error(
    result: SpeakResult,
    exc: Exception,
    on_error: Callable[[str], None] | None,
    provider: str,
) -> dict[str, Any]:
    """The error result of a failed synthesis; ``on_error`` hears about it too."""
    logger.warning("synthesis failed", extra={"provider": provider}, exc_info=exc)
    events = getattr(getattr(result.session, "port", None), "events", None)
    if events is not None:
        events.emit(ERROR, vendor=provider, role="tts", reason="synthesis_failed")
    if on_error is not None:
        try:
            on_error(f"{_ERROR_LABELS.get(provider, provider + '_tts_failed')}: {exc}")
        except Exception:
            logger.exception("on_error callback failed")
    return result.build(error=str(exc) or type(exc).__name__)


async def speak_in_thread(
    speak: Callable[..., dict[str, Any]],
    text: str,
    session: VoiceSession,
    stop_event: threading.Event | None = None,
) -> dict[str, Any]:
    """Await a blocking ``speak(text, session, stop_event)`` run in a thread of its own.

    Synthesis SDKs block, so the speech runs off the loop; its own thread (not the shared
    executor) means many calls speaking at once never queue behind each other. Cancelling
    the awaiting task stops the speech (its queued audio is cleared) and does not wait.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[dict[str, Any]] = loop.create_future()
    stop = stop_event if stop_event is not None else threading.Event()

    def deliver(result: dict[str, Any] | None, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result or {})

    def run() -> None:
        try:
            result, exc = speak(text, session, stop), None
        except BaseException as err:  # handed to the awaiting task, not lost in this thread
            result, exc = None, err
        try:
            loop.call_soon_threadsafe(deliver, result, exc)
        except RuntimeError:  # the loop is closed: nobody awaits the result any more
            pass

    threading.Thread(target=run, name="vr-speak", daemon=True).start()
    try:
        return await fut
    except asyncio.CancelledError:
        stop.set()
        raise


async def speak_async(
    tts: Any,
    text: str,
    session: VoiceSession,
    stop_event: threading.Event | None = None,
) -> dict[str, Any]:
    """Speak with any TTS provider from a coroutine: its ``speak_async`` when it has one.

    A 0.1.x-style provider with only a blocking ``speak`` runs it in a thread of its own.
    """
    native = getattr(tts, "speak_async", None)
    if callable(native):
        result: dict[str, Any] = await native(text, session, stop_event)
        return result
    return await speak_in_thread(tts.speak, text, session, stop_event)


class SpeakFromAsync:
    """Gives a provider whose core is ``speak_async`` its blocking ``speak`` (one place)."""

    if TYPE_CHECKING:

        async def speak_async(
            self,
            text: str,
            session: VoiceSession,
            stop_event: threading.Event | None = None,
        ) -> dict[str, Any]: ...

    def speak(
        self,
        text: str,
        session: VoiceSession,
        stop_event: threading.Event | None = None,
    ) -> dict[str, Any]:
        """Speak ``text`` and wait until the caller heard it (blocking; runs speak_async)."""
        return speak_sync(
            lambda: self.speak_async(text, session, stop_event),
            session,
            f"{type(self).__name__}.speak",
        )
