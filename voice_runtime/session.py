"""VoiceSession: the per-call coordinator between consumer code and a transport.

The session owns the call's queues, marks, intents and lifecycle. It knows nothing about
Twilio JSON, websockets or vendors. Consumer code is often synchronous and runs in its own
threads; the session lives on the transport's event loop. Every method says which side may
call it:

* "any thread": safe from the loop thread and from other threads. On the loop thread the
  work is done inline; from another thread it is handed to the loop.
* "blocking": waits; raises :class:`~voice_runtime.errors.LoopThreadError` on the loop thread
  (it would deadlock there). Each has an ``*_async`` twin for coroutines.
* "loop only": called by transports and providers from coroutines on the session's loop.

This module is the consumer facade. Transports talk to :attr:`VoiceSession.port`
(:mod:`voice_runtime.stream_port`, which also does the work of the ``signal_*`` hooks and the
end and reset of a call); mark ordering, clear generations and the sent/queued/played
positions are kept by the sans-I/O :class:`~voice_runtime.playback.PlaybackLedger`; the older
transport-side names live in :mod:`voice_runtime._session_transport`. The blocking methods
wrap their ``*_async`` twins through one helper (:meth:`VoiceSession._blocking`), so both
behave alike. User callbacks fired on the loop thread run off it (see :meth:`_user_callback`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from voice_runtime._queues import SessionStats, _AudioQueue, _CountingQueue
from voice_runtime._session_transport import TransportSide
from voice_runtime._sync import Flag, call_on_loop, forbid_on_loop, running_loop
from voice_runtime.audio.pcm import FRAME_BYTES  # re-exported: 0.1.x imported it from here
from voice_runtime.config import ModuleConstants
from voice_runtime.errors import (
    CallHangupError,
    CallNotAnsweredError,
    MissingStreamUrlError,
    NoEventLoopError,
)
from voice_runtime.logutil import LogLimiter
from voice_runtime.playback import OutboundClear, OutboundMark, PlaybackLedger
from voice_runtime.stream_port import (
    DTMF_MAXSIZE,  # noqa: F401 - was defined here in 0.2
    StreamPort,
    run_fn,
)
from voice_runtime.types import CallInfo, SessionEvent

if TYPE_CHECKING:
    from voice_runtime.contracts import SttProvider

logger = logging.getLogger(__name__)

INBOUND_MAXSIZE = 1500  # 30 s of 20 ms caller frames
# Bytes bound the queues too: chunks can be larger than 20 ms, and a peer choosing their
# size must not make one call hold more than about a megabyte of audio. Twilio's 160-byte
# frames reach the item bound first (240 kB).
INBOUND_MAX_BYTES = 1 << 20  # about 2 minutes of μ-law
OUTBOUND_MAXSIZE = 3000
OUTBOUND_MAX_BYTES = 2 << 20  # about 4.4 minutes of agent audio queued ahead of playback
# A blocking wrapper waits this much beyond the async twin's own timeout before giving up.
_BLOCKING_GRACE_S = 1.0
# What a coroutine awaits instead of each blocking method (named in LoopThreadError).
_ASYNC_TWINS = {
    "send_mark_and_wait": "send_mark_and_wait_async",
    "iter_dtmf": "dtmf",
    "gather_digits": "gather_digits_async",
    "leave_voicemail": "leave_voicemail_async",
}

# 0.1.x read VOICE_SERVER_PORT at import; now reading it gives the setting at that moment.
ModuleConstants(__name__, {"VOICE_SERVER_PORT": "voice_server_port"})

__all__ = [
    "FRAME_BYTES",
    "CallHangupError",
    "CallNotAnsweredError",
    "MissingStreamUrlError",
    "OutboundClear",
    "OutboundMark",
    "SessionStats",
    "VoiceSession",
]

_T = TypeVar("_T")


def _new_inbound() -> asyncio.Queue[bytes | None]:
    return _AudioQueue(INBOUND_MAXSIZE, INBOUND_MAX_BYTES)


def _new_outbound() -> asyncio.Queue[bytes]:
    return _CountingQueue(OUTBOUND_MAXSIZE, OUTBOUND_MAX_BYTES)


@dataclass
class VoiceSession(TransportSide):
    """Per-call coordinator: queues, marks, intents and lifecycle of one call at a time."""

    call_sid: str | None = None
    stream_sid: str | None = None
    caller_number: str | None = None
    inbound: asyncio.Queue[bytes | None] = field(default_factory=_new_inbound)
    outbound: asyncio.Queue[bytes] = field(default_factory=_new_outbound)
    stt: SttProvider | None = field(default=None, repr=False)
    stt_factory: Callable[[], SttProvider] | None = field(default=None, repr=False)
    stt_secondary_factory: Callable[[], SttProvider] | None = field(default=None, repr=False)
    on_stt_ready: Callable[[SttProvider], None] | None = field(default=None, repr=False)
    on_disconnected: Callable[[], None] | None = field(default=None, repr=False)
    on_dtmf: Callable[[str], None] | None = field(default=None, repr=False)
    on_event: Callable[[SessionEvent], None] | None = field(default=None, repr=False)

    call_info: CallInfo | None = field(default=None, repr=False)
    #: Call controls (transfer, DTMF, recording) the transport sets when the stream starts.
    control: Any = field(default=None, repr=False)
    stats: SessionStats = field(default_factory=SessionStats, repr=False)

    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _ws_connected: Flag = field(default_factory=Flag, repr=False)
    _disconnected: Flag = field(default_factory=Flag, repr=False)
    _mixer: Any = field(default=None, repr=False)
    _call_generation: int = field(default=0, repr=False)
    _disconnect_requested: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _pending_disconnect: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        self.playback = PlaybackLedger()
        #: The transport-facing side of this session (see :mod:`voice_runtime.stream_port`).
        self.port = StreamPort(self, self.playback)
        self._loop_none_warned = False
        # The call generation whose disconnect request was logged: an app's hangup and the
        # runtime's end-after-handler both request it, and one call gets one log line.
        self._disconnect_logged: int | None = None
        # Peers control how often some things happen (unknown marks, drops): first few, then
        # one in N, per call; SessionStats counts them all.
        self._log_limit = LogLimiter()
        # Set when the stream connects or the call ends first (e.g. no answer), so
        # wait_for_ws_connect() returns at once in either case.
        self._settled = Flag()
        # Called on the loop thread with each caller frame (barge-in VAD, meters); keep cheap.
        self.inbound_taps: list[Callable[[bytes], None]] = []
        self.port.bind_outbound()

    # ------------------------------------------------------------------ loop binding

    def set_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind the session to the transport's event loop (any thread)."""
        self._loop = loop
        if self._pending_disconnect:
            self._pending_disconnect = False
            call_on_loop(loop, self._disconnect_requested.set)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the session is bound to, or None."""
        return self._loop

    def _require_loop(self, method: str) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise NoEventLoopError(
                f"{method}() needs the session's event loop, and no transport has bound one yet "
                f"(the media stream has not connected: call wait_for_ws_connect() first)"
            )
        return self._loop

    def _on_loop(self, fn: Callable[..., Any], *args: Any) -> bool:
        loop = self._loop
        if loop is None:
            return False
        return call_on_loop(loop, fn, *args)

    # ------------------------------------------------------------------ the blocking helper

    def _blocking(
        self,
        method: str,
        coro: Coroutine[Any, Any, _T],
        timeout: float | None,
        closed: _T,
        *,
        grace: float = _BLOCKING_GRACE_S,
    ) -> _T:
        """Run ``coro`` (an ``*_async`` twin) on the session's loop and wait for its result.

        Blocking; raises on the loop thread and without a loop. One deadline bounds the wait:
        ``timeout`` plus ``grace`` (the twin's own timeout fires first; the grace covers the hop
        back). ``closed`` is returned when the loop is gone or the call ended meanwhile.
        """
        try:
            loop = self._require_loop(method)
            forbid_on_loop(loop, method, _ASYNC_TWINS.get(method))
        except BaseException:
            coro.close()
            raise
        try:
            fut = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError:  # the loop is closed
            coro.close()
            return closed
        deadline = None if timeout is None else time.monotonic() + timeout + grace
        try:
            return fut.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            fut.cancel()
            if self.is_disconnected:
                return closed
            raise TimeoutError(f"{method}() did not finish within {timeout}s") from None
        except concurrent.futures.CancelledError:
            return closed

    # ------------------------------------------------------------------ caller audio

    def put_inbound(self, data: bytes | None) -> None:
        """Queue caller audio for the STT (any thread); ``None`` ends the stream.

        The queue is bounded: when full, the oldest frame is dropped and counted, so the STT
        always gets the most recent audio. Without a loop the frame is dropped and a warning
        is logged once.
        """
        if self._loop is None:
            if not self._loop_none_warned:
                self._loop_none_warned = True
                logger.warning("caller audio dropped: session has no event loop yet")
            if data is not None:
                self.stats.inbound_dropped += 1
                self.stats.inbound_dropped_bytes += len(data)
            return
        if not self._on_loop(self.port.push_inbound, data) and data is not None:
            self.stats.inbound_dropped += 1
            self.stats.inbound_dropped_bytes += len(data)

    def clear_inbound(self) -> None:
        """Drop caller audio queued for the STT (any thread; waits up to 1 s off the loop)."""
        loop = self._loop
        if loop is None or running_loop() is loop:
            self.port.drain_inbound()
            return
        with contextlib.suppress(TimeoutError):
            self._blocking("clear_inbound", run_fn(self.port.drain_inbound), 1.0, 0, grace=0.0)

    # ------------------------------------------------------------------ agent audio

    def put_outbound_sync(self, data: bytes) -> None:
        """Queue agent audio for the caller (any thread).

        Before a transport binds a loop the audio is buffered in the queue (never dropped
        silently) and sent once the stream starts. The queue is bounded in chunks and in bytes
        (``OUTBOUND_MAXSIZE``, ``OUTBOUND_MAX_BYTES``): a chunk that does not fit is dropped,
        counted in ``stats.outbound_dropped``/``outbound_dropped_bytes`` and logged; the
        audio queued before it is kept, so what plays is never reordered.
        """
        if not data:
            return
        if self._loop is None:
            self.port.push_outbound(data)
            return
        if not self._on_loop(self.port.push_outbound, data):
            self.port.count_outbound_drop("event loop closed", len(data))

    async def put_outbound(self, data: bytes) -> None:
        """Queue agent audio from a coroutine on the loop, waiting while the queue is full.

        Full includes the byte bound, so a fast producer is held back instead of dropped.
        """
        if data and not self._disconnected.is_set():
            await self.outbound.put(data)

    # ------------------------------------------------------------------ marks and positions

    def send_mark_and_wait(self, mark_name: str, timeout: float = 10.0) -> bool:
        """Queue a mark behind the audio queued so far and block until the caller heard it.

        Blocking. The wire name is ``f"{mark_name}__{8 hex}"``, unique per send. Returns True
        when the audio before the mark was played, False when it was cleared or the call
        ended. Raises the built-in TimeoutError on timeout unless the call is disconnected.
        """
        coro = self.send_mark_and_wait_async(mark_name, timeout)
        return self._blocking("send_mark_and_wait", coro, timeout, False)

    async def send_mark_and_wait_async(self, mark_name: str, timeout: float = 10.0) -> bool:
        """Async twin of :meth:`send_mark_and_wait` (loop only)."""
        if self._loop is None:
            self.set_loop(asyncio.get_running_loop())
        marks = self.port.marks
        unique, waiter = marks.register(mark_name)
        if self._disconnected.is_set():
            waiter.resolve("disconnected")
        try:
            if not waiter.future.done():
                waiter.mark = OutboundMark(unique, 0)
                self.port.queue_mark(waiter.mark)
            try:
                status = await asyncio.wait_for(asyncio.wrap_future(waiter.future), timeout)
            except TimeoutError:
                if self.is_disconnected:
                    return False
                raise TimeoutError(
                    f"Mark {mark_name!r} ({unique}) not received within {timeout}s"
                ) from None
            return status == "played"
        finally:
            marks.forget(unique)

    @property
    def sent_ms(self) -> float:
        """Milliseconds of agent audio sent to the far end in this call."""
        return self.playback.sent_ms

    @property
    def queued_ms(self) -> float:
        """Milliseconds of agent audio queued in this call so far (reset to played_ms by a clear).

        Sent, played and queued positions share one axis, so a producer can note
        ``queued_ms`` before queueing an utterance and later compare ``played_ms`` to it.
        """
        return self.playback.queued_ms

    @property
    def played_ms(self) -> float:
        """Milliseconds of agent audio the caller has heard, from mark echoes."""
        return self.playback.played_ms

    @property
    def clear_generation(self) -> int:
        """How many clears this call has had; echoes of older marks are not counted."""
        return self.playback.generation

    @property
    def agent_audio_pending(self) -> bool:
        """True while agent audio is queued locally or sent but not yet confirmed played."""
        return (not self.outbound.empty()) or self.playback.unconfirmed()

    # ------------------------------------------------------------------ lifecycle

    def _mark_connected(self) -> None:
        self._ws_connected.set()
        self._settled.set()

    # wait_for_ws_connect and wait_until_disconnected wait on thread-safe Flags, not through
    # _blocking: they must work before any transport has bound a loop (an outbound script
    # waits for its call's stream to connect).

    def wait_for_ws_connect(self, timeout: float = 30.0) -> None:
        """Block until the media stream connects; CallNotAnsweredError on timeout.

        Also raises CallNotAnsweredError at once when the call ends before its stream
        connects (busy, no answer, failed: the server's status callback reports it).
        """
        forbid_on_loop(self._loop, "wait_for_ws_connect", "wait_for_ws_connect_async")
        self._settled.wait(timeout)
        if not self._ws_connected.is_set():
            raise CallNotAnsweredError(timeout)

    async def wait_for_ws_connect_async(self, timeout: float = 30.0) -> None:
        """Async twin of :meth:`wait_for_ws_connect`."""
        await self._settled.wait_async(timeout)
        if not self._ws_connected.is_set():
            raise CallNotAnsweredError(timeout)

    @property
    def is_connected(self) -> bool:
        """True once the media stream has started and until reset."""
        return self._ws_connected.is_set()

    def signal_disconnected(self) -> None:
        """Mark the call as ended (idempotent, any thread).

        Puts ``None`` on inbound, releases every pending mark, ends the DTMF iterators and
        calls ``on_disconnected`` once.
        """
        if self._disconnected.is_set():
            return
        self._disconnected.set()
        self._settled.set()
        logger.info("call disconnected", extra={"call_sid": self.call_sid})
        if self._loop is not None:
            self._on_loop(self.port.finish_ended)
        else:
            self.port.finish_ended()
        self.port.marks.release_all("disconnected")
        if self.on_disconnected is not None:
            self._user_callback(self.on_disconnected, what="on_disconnected", essential=True)

    @property
    def is_disconnected(self) -> bool:
        """True once the call has ended."""
        return self._disconnected.is_set()

    def wait_until_disconnected(self, timeout: float | None = None) -> bool:
        """Block until the call ends; False on timeout."""
        forbid_on_loop(self._loop, "wait_until_disconnected", "wait_until_disconnected_async")
        return self._disconnected.wait(timeout)

    async def wait_until_disconnected_async(self, timeout: float | None = None) -> bool:
        """Async twin of :meth:`wait_until_disconnected`."""
        return await self._disconnected.wait_async(timeout)

    @property
    def generation(self) -> int:
        """Call generation; bumps on every reset(), so stale requests can be told apart."""
        return self._call_generation

    def reset(self) -> None:
        """Prepare the session for the next call.

        Releases and clears pending marks, clears the connected/disconnected flags, the
        stream_sid, the intents and the call info, stops and drops the STT and drains both
        queues; keeps call_sid, caller_number, factories and mixer.
        """
        self._call_generation += 1
        self.port.reset_session()

    # ------------------------------------------------------------------ intents

    def request_disconnect(
        self, generation: int | None = None, *, after_playback: bool = False
    ) -> None:
        """Ask the transport to end the call (any thread); a stale ``generation`` is ignored.

        With ``after_playback=True`` the call ends once the agent audio queued so far has been
        heard (its mark echoed), so the last sentence is not cut off.
        """
        if generation is not None and generation != self._call_generation:
            logger.warning(
                "stale disconnect request ignored",
                extra={"generation": generation, "current": self._call_generation},
            )
            return
        if self._loop is None:
            self._pending_disconnect = True
            logger.info("disconnect requested before the stream started; will apply on start")
            return
        self._on_loop(
            self.port.queue_end_mark if after_playback else self._set_disconnect_requested
        )
        if self._disconnect_logged != self._call_generation:
            self._disconnect_logged = self._call_generation
            logger.info("disconnect requested", extra={"call_sid": self.call_sid})

    def _set_disconnect_requested(self) -> None:
        self._disconnect_requested.set()

    @property
    def disconnect_requested(self) -> bool:
        """True once consumer code asked the transport to end the call."""
        return self._disconnect_requested.is_set() or self._pending_disconnect

    def request_clear_buffer(self, *, keep_uninterruptible: bool = False) -> None:
        """Discard agent audio not yet heard (any thread).

        Drops audio and marks still queued locally (their waiters return as cleared) and
        asks the transport to send a ``clear`` for what the far end has buffered. Barge-in
        passes ``keep_uninterruptible=True``: then nothing is cleared while audio queued in
        an :meth:`uninterruptible` block is unheard. Without it everything is cleared.
        """
        if self._loop is None:
            self.port.clear_local(keep_uninterruptible)
            return
        self._on_loop(self.port.clear_local, keep_uninterruptible)

    @contextlib.contextmanager
    def uninterruptible(self) -> Iterator[None]:
        """Agent audio queued inside the block is not cleared by barge-in (any thread)."""
        self._in_order(self.playback.protect_begin)
        try:
            yield
        finally:
            self._in_order(self.playback.protect_end)

    def _in_order(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop in order with the audio queued so far (inline without one)."""
        if self._loop is None or not self._on_loop(fn):
            fn()

    # ------------------------------------------------------------------ DTMF and events

    async def dtmf(self) -> AsyncIterator[str]:
        """Yield the caller's DTMF digits until the call ends (loop only)."""
        while (digit := await self.port.next_dtmf()) is not None:
            yield digit

    def iter_dtmf(self, timeout: float | None = None) -> Iterator[str]:
        """Yield the caller's DTMF digits from a worker thread until the call ends.

        Blocking. Stops early when no digit arrives within ``timeout`` seconds.
        """
        while True:
            try:
                digit = self._blocking("iter_dtmf", self.port.next_dtmf(), timeout, None, grace=0.0)
            except TimeoutError:
                return
            if digit is None:
                return
            yield digit

    def emit_event(self, event: SessionEvent) -> None:
        """Deliver a lifecycle event to ``on_event`` (any thread; off the loop thread, in order)."""
        if self.on_event is not None:
            self._user_callback(self.on_event, event, what="on_event")

    def _user_callback(
        self, fn: Callable[..., Any], *args: Any, what: str, essential: bool = False
    ) -> None:
        """Run a user callback without blocking the loop (see ``CallbackLane.dispatch``)."""
        self.port.callbacks.dispatch(self._loop, fn, *args, what=what, essential=essential)

    # ------------------------------------------------------------------ monitoring

    def set_mixer(self, m: Any) -> None:
        """Attach an AudioMixer that receives both call legs."""
        self._mixer = m
