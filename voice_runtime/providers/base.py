"""Shared provider behaviour: speak() results, playback waits, echo discard, STT reconnects."""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import logging
import random
import threading
import time
from collections.abc import AsyncIterable, Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from voice_runtime._compat import is_voice_session, number
from voice_runtime._sync import forbid_on_loop
from voice_runtime.playback import Segment

if TYPE_CHECKING:
    from voice_runtime.session import VoiceSession

logger = logging.getLogger(__name__)

ECHO_TAIL_S = 0.4
MARK_TIMEOUT_S = 30.0
STOP_POLL_S = 0.02  # how often speak() looks at stop_event while the caller listens
HEALTHY_AFTER_S = 5.0  # an STT connection that lived this long counts as a working one

#: Why one STT connection ended: the caller's side is done (``stopped``, ``end_of_input``),
#: no reconnect can help (``terminal``), or a new connection may work (``fatal``).
EndKind = Literal["stopped", "end_of_input", "terminal", "fatal"]

#: How ``on_error`` names a failed synthesis, as the 0.1.x providers did
#: (``elevenlabs_tts_failed: …``); other providers follow the same pattern.
_ERROR_LABELS = {"azure": "azure_synthesis_failed"}

__all__ = [
    "CallerAudioBuffer",
    "EchoGate",
    "ReconnectingStt",
    "SpeakResult",
    "backoff_delay",
    "nothing_to_say",
    "play_chunks",
    "play_chunks_async",
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


def _finish(
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
        played = _wait_heard(session, stop_event, mark_timeout)
    except TimeoutError:
        logger.warning("tts_complete mark not echoed in time; audio may have been cut off")
        return result.build()
    if session.is_disconnected:
        return result.build(call_disconnected=True)
    if not played or (stop_event is not None and stop_event.is_set()):
        return result.build(interrupted=True)
    return result.build()


def _wait_heard(session: VoiceSession, stop_event: threading.Event | None, timeout: float) -> bool:
    """Wait for the ``tts_complete`` mark; a stop_event set meanwhile clears the audio.

    Synthesis usually runs ahead of playback, so most of an utterance is queued before the
    stop comes: the stop must cut the playback, not only the synthesis.
    """
    loop = session.loop
    if stop_event is None or loop is None:
        return session.send_mark_and_wait("tts_complete", timeout=timeout)
    forbid_on_loop(loop, "speak")
    try:
        fut = asyncio.run_coroutine_threadsafe(
            session.send_mark_and_wait_async("tts_complete", timeout), loop
        )
    except RuntimeError:  # the loop is closed: the call is over
        return False
    cleared = False
    while True:
        try:
            return fut.result(timeout=STOP_POLL_S)
        except TimeoutError:
            if fut.done():
                raise  # the mark itself timed out
            if not cleared and stop_event.is_set():
                cleared = True
                session.request_clear_buffer()  # resolves the mark as cleared


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
    if not is_voice_session(session):
        return _play_duck_typed(
            text,
            session,
            chunks,
            stop_event,
            on_error=on_error,
            provider=provider,
            mark_timeout=mark_timeout,
        )
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
        return _report_error(result, exc, on_error, provider)
    logger.debug(
        "synthesis queued", extra={"provider": provider, "seconds": round(time.monotonic() - t0, 3)}
    )
    return _finish(result, session, stop_event, mark_timeout)


def _report_error(
    result: SpeakResult,
    exc: Exception,
    on_error: Callable[[str], None] | None,
    provider: str,
) -> dict[str, Any]:
    """The error result of a failed synthesis; ``on_error`` hears about it too."""
    logger.warning("synthesis failed", extra={"provider": provider}, exc_info=exc)
    if on_error is not None:
        try:
            on_error(f"{_ERROR_LABELS.get(provider, provider + '_tts_failed')}: {exc}")
        except Exception:
            logger.exception("on_error callback failed")
    return result.build(error=str(exc) or type(exc).__name__)


def _play_duck_typed(
    text: str,
    session: Any,
    chunks: Iterable[bytes],
    stop_event: threading.Event | None,
    *,
    on_error: Callable[[str], None] | None,
    provider: str,
    mark_timeout: float,
) -> dict[str, Any]:
    """:func:`play_chunks` for a session that is not a VoiceSession: the 0.1.x calls only.

    ``put_outbound_sync`` and ``tap_agent`` per chunk, then one
    ``send_mark_and_wait("tts_complete", timeout=...)``; nothing that reads session internals.
    """
    result = SpeakResult(text, session)
    if session.is_disconnected:
        return result.build(call_disconnected=True)
    try:
        for chunk in chunks:
            if stop_event is not None and stop_event.is_set():
                return result.build(interrupted=True)
            if not chunk:
                continue
            result.add_audio(len(chunk))
            session.put_outbound_sync(chunk)
            session.tap_agent(chunk)
    except Exception as exc:
        return _report_error(result, exc, on_error, provider)
    try:
        session.send_mark_and_wait("tts_complete", timeout=mark_timeout)
    except TimeoutError:
        logger.warning("tts_complete mark not echoed in time; audio may have been cut off")
    return result.build()


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
        return _report_error(result, exc, on_error, provider)
    if stop_event is not None and stop_event.is_set():
        session.request_clear_buffer()
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

    def __init__(
        self, tail_s: float = ECHO_TAIL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
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


def backoff_delay(
    attempt: int, base_s: float = 1.0, max_s: float = 30.0, jitter: float = 0.25
) -> float:
    """Seconds to wait before reconnect ``attempt`` (0-based): ``base·2ⁿ`` capped, ± jitter."""
    delay = min(base_s * (2**attempt), max_s)
    return delay * (1.0 - jitter + 2.0 * jitter * random.random())  # noqa: S311 (not crypto)


class CallerAudioBuffer:
    """Caller audio a reconnecting STT must not lose (loop thread only).

    ``pending`` frames have not reached the vendor yet; ``sent`` frames went to the current
    connection since its last final transcript. When a connection dies, :meth:`rewind` puts
    the sent frames back in front of the pending ones, so the next connection hears the
    whole utterance in progress. Both together are bounded by ``max_ms``: the oldest audio
    goes first, and what was dropped is counted.
    """

    def __init__(self, max_ms: float = 20_000.0) -> None:
        self.max_bytes = int(max_ms * 8)
        self.dropped_bytes = 0
        self._pending: collections.deque[bytes] = collections.deque()
        self._sent: collections.deque[bytes] = collections.deque()
        self._pending_bytes = 0
        self._sent_bytes = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes waiting to be sent."""
        return self._pending_bytes

    @property
    def sent_bytes(self) -> int:
        """Bytes sent since the last final transcript (replayed after a reconnect)."""
        return self._sent_bytes

    def push(self, frame: bytes) -> None:
        """Queue one caller frame to be sent."""
        self._pending.append(frame)
        self._pending_bytes += len(frame)
        while self._pending_bytes + self._sent_bytes > self.max_bytes:
            if self._sent:
                old = self._sent.popleft()
                self._sent_bytes -= len(old)
            else:
                old = self._pending.popleft()
                self._pending_bytes -= len(old)
            self.dropped_bytes += len(old)

    def peek(self, max_bytes: int) -> list[bytes]:
        """The next pending frames, at least one and at most ``max_bytes`` in all."""
        out: list[bytes] = []
        total = 0
        for frame in self._pending:
            if out and total + len(frame) > max_bytes:
                break
            out.append(frame)
            total += len(frame)
        return out

    def ack(self, count: int) -> None:
        """Mark the first ``count`` pending frames as sent."""
        for _ in range(min(count, len(self._pending))):
            frame = self._pending.popleft()
            self._pending_bytes -= len(frame)
            self._sent.append(frame)
            self._sent_bytes += len(frame)

    def committed(self) -> None:
        """A final transcript arrived: the audio sent so far no longer needs a replay."""
        self._sent.clear()
        self._sent_bytes = 0

    def rewind(self) -> None:
        """The connection died: send the unconfirmed audio again, before the pending audio."""
        self._sent.extend(self._pending)
        self._pending, self._sent = self._sent, collections.deque()
        self._pending_bytes += self._sent_bytes
        self._sent_bytes = 0

    def clear(self) -> None:
        """Forget all audio."""
        self._pending.clear()
        self._sent.clear()
        self._pending_bytes = self._sent_bytes = 0


class ReconnectingStt(abc.ABC):
    """Skeleton of an STT that keeps one vendor connection per call and reconnects.

    It owns the callbacks, the counters, the echo discard, the reconnect buffer, the task
    that moves caller frames into that buffer and the reconnect loop (exponential backoff,
    at most ``max_reconnects`` consecutive attempts, reset by a healthy connection; a
    terminal end or exhausted attempts call ``on_error``). A vendor implements the hooks:
    :meth:`_session_once` runs one connection, :meth:`_flush`, :meth:`_close_input` and
    :meth:`_disconnect` move audio and end it.
    """

    #: Name of the run task; the pump task is ``<name>-pump``.
    _task_name: ClassVar[str] = "stt"
    #: The vendor module's logger: its name says which vendor a message is about.
    _logger: ClassVar[logging.Logger] = logger
    #: False: once the caller's audio has ended, no further connection is attempted.
    _connect_after_input_end: ClassVar[bool] = True

    def __init__(
        self,
        *,
        max_reconnects: int,
        reconnect_base_delay: float,
        reconnect_max_delay: float,
        buffer_ms: float,
        echo_tail_s: float | Callable[[], float],
    ) -> None:
        self.max_reconnects = max_reconnects
        self.reconnect_base_delay = reconnect_base_delay
        self.reconnect_max_delay = reconnect_max_delay

        self.on_committed: Callable[[str], None] | None = None
        self.on_recognizing: Callable[[str], None] | None = None
        self.on_error: Callable[[str], None] | None = None

        self.connections = 0  # vendor connections opened, for operators and tests
        self.reconnects = 0
        self.failed = False  # True once on_error said the provider gave up
        # A callable tail is asked each time the agent stops speaking (a patched module
        # constant takes effect on a running provider, as in 0.1.x).
        self._echo_tail = echo_tail_s
        self._echo = EchoGate(echo_tail_s() if callable(echo_tail_s) else echo_tail_s)
        self._buffer = CallerAudioBuffer(buffer_ms)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._healthy = False  # set by the hooks once the current connection proved itself
        self._input_ended = False
        self._stopping = False
        self._pump_task: asyncio.Task[None] | None = None
        self._run_task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        """True while the provider is connected or reconnecting (False once it gave up)."""
        return self._run_task is not None and not self._run_task.done()

    def set_speaking(self, speaking: bool) -> None:
        """Tell the provider whether the agent is speaking (echo discard)."""
        if callable(self._echo_tail):
            self._echo.tail_s = self._echo_tail()
        self._echo.set_speaking(speaking)

    async def start(self, inbound_queue: asyncio.Queue[bytes | None]) -> None:
        """Start reading caller audio and connecting; returns at once."""
        if self._run_task is not None:
            raise RuntimeError(f"{type(self).__name__}.start() called twice")
        self._check_credentials()
        self._loop = asyncio.get_running_loop()
        self._pump_task = asyncio.create_task(
            self._pump(inbound_queue), name=f"{self._task_name}-pump"
        )
        self._run_task = asyncio.create_task(self._run(), name=self._task_name)

    async def stop(self) -> None:
        """Close the vendor connection and end every task; idempotent."""
        self._stopping = True
        tasks = [t for t in (self._run_task, self._pump_task) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        await self._disconnect()
        self._buffer.clear()

    # ------------------------------------------------------------------ vendor hooks

    def _check_credentials(self) -> None:
        """Raise MissingCredentialError when the vendor credential is missing (at start())."""
        return None  # a vendor without credentials needs no check

    @abc.abstractmethod
    async def _session_once(self) -> tuple[EndKind, str]:
        """Open one connection, serve it until it ends and close it; say why and the reason.

        Set ``_healthy`` once the connection proved itself, count it in ``connections``, and
        log a lost connection in the vendor's words.
        """

    @abc.abstractmethod
    def _flush(self) -> None:
        """Caller audio was buffered: get it to the live connection, if any (never blocks)."""

    @abc.abstractmethod
    def _close_input(self) -> None:
        """The caller's audio ended: let the live connection finish its last utterance."""

    @abc.abstractmethod
    async def _disconnect(self) -> None:
        """Release the connection :meth:`stop` interrupted, if any."""

    # ------------------------------------------------------------------ skeleton

    async def _pump(self, inbound: asyncio.Queue[bytes | None]) -> None:
        """Move caller frames into the reconnect buffer, whatever state the connection is in."""
        while True:
            frame = await inbound.get()
            if frame is None:
                self._input_ended = True
                self._close_input()
                return
            if self.failed:
                continue  # gave up (on_error was called); keep draining the queue
            self._buffer.push(frame)
            self._flush()

    async def _run(self) -> None:
        """Connect, serve, and reconnect with backoff until stopped, ended or given up."""
        attempt = 0  # consecutive reconnect attempts since the last healthy connection
        first = True
        while not self._stopping and (self._connect_after_input_end or not self._input_ended):
            if not first:
                if attempt >= self.max_reconnects:
                    self._give_up(f"reconnect_exhausted_after_{attempt}_attempts")
                    return
                delay = backoff_delay(attempt, self.reconnect_base_delay, self.reconnect_max_delay)
                self._logger.info(
                    "reconnecting STT", extra={"attempt": attempt + 1, "delay_s": round(delay, 3)}
                )
                await asyncio.sleep(delay)
                attempt += 1
                self.reconnects += 1
            first = False
            self._healthy = False
            # The new connection hears the unconfirmed utterance in progress again.
            self._buffer.rewind()
            kind, reason = await self._session_once()
            if self._healthy:
                attempt = 0
            if kind in ("stopped", "end_of_input") or self._stopping:
                return
            if kind == "terminal":
                self._give_up(reason)
                return

    def _give_up(self, reason: str) -> None:
        self.failed = True
        self._buffer.clear()
        self._logger.error("STT gave up", extra={"reason": reason})
        self._emit(self.on_error, reason)

    def _emit(self, callback: Callable[[str], None] | None, text: str) -> None:
        if callback is None:
            return
        try:
            callback(text)
        except Exception:
            self._logger.exception("STT callback failed")
