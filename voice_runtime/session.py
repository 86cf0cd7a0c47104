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

Transports talk to :attr:`VoiceSession.port` (:mod:`voice_runtime.stream_port`) only; mark
ordering, clear generations and the sent/queued/played positions are kept by the sans-I/O
:class:`~voice_runtime.playback.PlaybackLedger`. The blocking methods wrap their ``*_async``
twins through one helper (:meth:`VoiceSession._blocking`), so both behave alike.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from voice_runtime._queues import SessionStats, _AudioQueue, _CountingQueue
from voice_runtime._sync import Flag, call_on_loop, forbid_on_loop, running_loop
from voice_runtime.audio.pcm import FRAME_BYTES  # re-exported: 0.1.x imported it from here
from voice_runtime.config import ModuleConstants
from voice_runtime.errors import (
    CallHangupError,
    CallNotAnsweredError,
    MissingStreamUrlError,
    NoEventLoopError,
)
from voice_runtime.logutil import LogLimiter, clip
from voice_runtime.playback import (
    MarkStatus,
    OutboundClear,
    OutboundMark,
    PlaybackLedger,
)
from voice_runtime.playback import user_mark_name as _user_mark_name
from voice_runtime.stream_port import StreamPort
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
DTMF_MAXSIZE = 256
# A blocking wrapper waits this much beyond the async twin's own timeout before giving up.
_BLOCKING_GRACE_S = 1.0

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


@dataclass(eq=False)
class _MarkWaiter:
    future: concurrent.futures.Future[MarkStatus]
    mark: OutboundMark | None = None


def _new_inbound() -> asyncio.Queue[bytes | None]:
    return _AudioQueue(INBOUND_MAXSIZE, INBOUND_MAX_BYTES)


def _new_outbound() -> asyncio.Queue[bytes]:
    return _CountingQueue(OUTBOUND_MAXSIZE, OUTBOUND_MAX_BYTES)


@dataclass
class VoiceSession:
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
    _pending_marks: dict[str, _MarkWaiter] = field(default_factory=dict, repr=False)
    _marks_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _mixer: Any = field(default=None, repr=False)
    _call_generation: int = field(default=0, repr=False)
    _disconnect_requested: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _pending_disconnect: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        self.playback = PlaybackLedger()
        #: The transport-facing side of this session (see :mod:`voice_runtime.stream_port`).
        self.port = StreamPort(self, self.playback)
        self._dtmf_queue: asyncio.Queue[str | None] = asyncio.Queue(DTMF_MAXSIZE)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_none_warned = False
        # Peers control how often some things happen (unknown marks, drops): first few, then
        # one in N, per call; SessionStats counts them all.
        self._log_limit = LogLimiter()
        # Set when the stream connects or the call ends first (e.g. no answer), so
        # wait_for_ws_connect() returns at once in either case.
        self._settled = Flag()
        # Called on the loop thread with each caller frame (barge-in VAD, meters); keep cheap.
        self.inbound_taps: list[Callable[[bytes], None]] = []
        self._bind_outbound()

    def _bind_outbound(self) -> None:
        if isinstance(self.outbound, _CountingQueue):
            self.outbound.on_put = self._on_outbound_put

    def _on_outbound_put(self, item: bytes) -> None:
        self.playback.queued_ms += len(item) / 8.0
        self.port.wakeup.set()

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

    def _put_inbound_now(self, data: bytes | None) -> None:
        """Delegate of ``port.push_inbound`` (loop only; kept for subclasses that call it)."""
        self.port.push_inbound(data)

    def clear_inbound(self) -> None:
        """Drop caller audio queued for the STT (any thread; waits up to 1 s off the loop)."""
        loop = self._loop
        if loop is None:
            self._drain_inbound()
            return
        if running_loop() is loop:
            self._drain_inbound()
            return
        done = concurrent.futures.Future[int]()

        def _drain() -> None:
            done.set_result(self._drain_inbound())

        if call_on_loop(loop, _drain):
            with contextlib.suppress(concurrent.futures.TimeoutError):
                done.result(timeout=1.0)

    def _drain_inbound(self) -> int:
        n = 0
        while True:
            try:
                item = self.inbound.get_nowait()
            except asyncio.QueueEmpty:
                return n
            if item is None:
                # The end-of-call sentinel must survive a drain.
                self.inbound.put_nowait(None)
                return n
            n += 1

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

    async def get_outbound(self) -> bytes:
        """Return the next queued agent audio chunk (loop only)."""
        return await self.outbound.get()

    # ------------------------------------------------------------------ blocking helper

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
            forbid_on_loop(loop, method)
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

    # ------------------------------------------------------------------ marks

    def _register_mark(self, mark_name: str) -> tuple[str, _MarkWaiter]:
        with self._marks_lock:
            while (unique := _user_mark_name(mark_name)) in self._pending_marks:
                pass
            waiter = _MarkWaiter(concurrent.futures.Future())
            self._pending_marks[unique] = waiter
        if self._disconnected.is_set():
            self._resolve(waiter, "disconnected")
        return unique, waiter

    def _queue_mark(self, mark: OutboundMark) -> None:
        out = self.outbound
        self.playback.queue_mark(mark, out.put_count if isinstance(out, _CountingQueue) else 0)
        self.port.wakeup.set()

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
        unique, waiter = self._register_mark(mark_name)
        try:
            if not waiter.future.done():
                waiter.mark = OutboundMark(unique, 0)
                self._queue_mark(waiter.mark)
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
            with self._marks_lock:
                self._pending_marks.pop(unique, None)

    def signal_mark_received(self, name: str) -> None:
        """Handle a mark echo from the far end (loop only); unknown names log a warning."""
        self.stats.marks_echoed += 1
        echo = self.playback.echo(name)
        if echo.kind != "user":
            if echo.kind == "bad" or echo.generation < 0:
                self.stats.unknown_marks += 1
            if echo.kind == "end":
                self._set_disconnect_requested()
            return
        with self._marks_lock:
            waiter = self._pending_marks.get(name)
        if waiter is None:
            self.stats.unknown_marks += 1
            if self._log_limit.allow("unknown_mark"):
                logger.warning(
                    "unknown mark echoed",
                    extra={
                        "call_sid": self.call_sid,
                        "mark": clip(name),
                        "unknown_marks": self.stats.unknown_marks,
                    },
                )
            return
        self._resolve(waiter, "played" if self.playback.mark_played(waiter.mark) else "cleared")

    @staticmethod
    def _resolve(waiter: _MarkWaiter, status: MarkStatus) -> None:
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            waiter.future.set_result(status)

    async def get_pending_mark(self) -> str:
        """Return the next mark name for a transport that sends marks on its own (loop only).

        Transports that care about ordering use ``port.next_outbound()`` instead.
        """
        return await self.port.next_mark_name()

    # ------------------------------------------------------------------ transport side (0.2 names)

    async def next_outbound(self) -> bytes | OutboundMark | OutboundClear:
        """Delegate of ``port.next_outbound()``: a clear, audio or a mark, in queue order."""
        return await self.port.next_outbound()

    def outbound_pending(self) -> bool:
        """Delegate of ``port.pending()``."""
        return self.port.pending()

    def note_audio_sent(self, nbytes: int) -> None:
        """Record that ``nbytes`` of μ-law agent audio went to the far end (loop only)."""
        self.playback.note_sent(nbytes)
        self.stats.audio_sent_bytes += nbytes
        self.stats.outbound_chunks += 1

    def position_mark_name(self) -> str:
        """Name of a mark that, when echoed, moves the playback position to now (loop only)."""
        self.stats.marks_sent += 1
        return self.playback.position_name()

    def queue_position_mark(self) -> None:
        """Ask for position marks as fine as the transport's messages (loop only).

        0.2 queued a mark behind the audio here; now the transport owns position marks and
        this only raises their granularity (see :meth:`PlaybackLedger.request_granularity`).
        """
        self.playback.request_granularity(1.0)

    @property
    def clear_pending(self) -> bool:
        """True when a clear was requested and not yet handed to the transport."""
        return self.port.clear_pending

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

    def signal_ws_connected(self, stream_sid: str) -> None:
        """Record the stream as connected and wake ``wait_for_ws_connect`` (transport)."""
        self.stream_sid = stream_sid
        if self._loop is None:
            loop = running_loop()
            if loop is not None:
                self.set_loop(loop)
        self._ws_connected.set()
        self._settled.set()
        logger.info("media stream connected", extra={"call_sid": self.call_sid})

    def apply_call_info(self, info: CallInfo) -> None:
        """Store what the stream's ``start`` said about the call (transport)."""
        self.call_info = info
        self.call_sid = info.call_sid
        if info.caller_number:
            self.caller_number = info.caller_number

    def wait_for_ws_connect(self, timeout: float = 30.0) -> None:
        """Block until the media stream connects; CallNotAnsweredError on timeout.

        Also raises CallNotAnsweredError at once when the call ends before its stream
        connects (busy, no answer, failed: the server's status callback reports it).
        """
        forbid_on_loop(self._loop, "wait_for_ws_connect")
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
            self._on_loop(self._finish_disconnect)
        else:
            self._finish_disconnect()
        with self._marks_lock:
            waiters = list(self._pending_marks.values())
        for waiter in waiters:
            self._resolve(waiter, "disconnected")
        if self.on_disconnected is not None:
            self._user_callback(self.on_disconnected, what="on_disconnected")

    def _finish_disconnect(self) -> None:
        self.port.push_inbound(None)
        self.playback.marks.clear()
        self.port.wakeup.set()
        with contextlib.suppress(asyncio.QueueFull):
            self._dtmf_queue.put_nowait(None)
        for task in list(self._tasks):
            task.cancel()

    @property
    def is_disconnected(self) -> bool:
        """True once the call has ended."""
        return self._disconnected.is_set()

    def wait_until_disconnected(self, timeout: float | None = None) -> bool:
        """Block until the call ends; False on timeout."""
        forbid_on_loop(self._loop, "wait_until_disconnected")
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
        with self._marks_lock:
            waiters = list(self._pending_marks.values())
            self._pending_marks.clear()
        for waiter in waiters:
            self._resolve(waiter, "disconnected")
        stt, self.stt = self.stt, None
        loop = self._loop
        if stt is not None:
            if loop is not None and loop.is_running():
                if running_loop() is loop:
                    task = loop.create_task(self._stop_stt(stt))
                    self._keep(task, cancel_on_disconnect=False)
                else:
                    asyncio.run_coroutine_threadsafe(self._stop_stt(stt), loop)
            else:
                logger.debug("STT dropped without stop: no running loop")
        self._ws_connected = Flag()
        self._disconnected = Flag()
        self._settled = Flag()
        self.stream_sid = None
        self.call_info = None
        self._pending_disconnect = False
        if loop is not None and loop.is_running() and running_loop() is not loop:
            done = concurrent.futures.Future[None]()

            def _reset_on_loop() -> None:
                self._reset_queues()
                done.set_result(None)

            if call_on_loop(loop, _reset_on_loop):
                with contextlib.suppress(concurrent.futures.TimeoutError):
                    done.result(timeout=2.0)
                    return
        self._reset_queues()

    def _reset_queues(self) -> None:
        self._disconnect_requested = asyncio.Event()
        self.playback.reset()
        self.stats = SessionStats()
        self._log_limit = LogLimiter()
        self.port.reset()
        self._bind_outbound()
        while True:
            try:
                self.inbound.get_nowait()
            except asyncio.QueueEmpty:
                break
        while True:
            try:
                self.outbound.get_nowait()
            except asyncio.QueueEmpty:
                break
        self._dtmf_queue = asyncio.Queue(DTMF_MAXSIZE)
        logger.info("session reset for the next call")

    @staticmethod
    async def _stop_stt(stt: SttProvider) -> None:
        try:
            await asyncio.wait_for(stt.stop(), 5.0)
        except Exception:
            logger.warning("STT stop failed during reset", exc_info=True)

    def _keep(self, task: asyncio.Task[Any], *, cancel_on_disconnect: bool = True) -> None:
        if cancel_on_disconnect:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            holder: set[asyncio.Task[Any]] = getattr(self, "_bg_tasks", set())
            self._bg_tasks = holder
            holder.add(task)
            task.add_done_callback(holder.discard)

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
        if after_playback:
            self._on_loop(self._queue_end_mark)
        else:
            self._on_loop(self._set_disconnect_requested)
        logger.info("disconnect requested", extra={"call_sid": self.call_sid})

    def _queue_end_mark(self) -> None:
        if self._disconnected.is_set():
            return
        self._queue_mark(self.playback.end_mark())

    def _set_disconnect_requested(self) -> None:
        self._disconnect_requested.set()

    @property
    def disconnect_requested(self) -> bool:
        """True once consumer code asked the transport to end the call."""
        return self._disconnect_requested.is_set() or self._pending_disconnect

    async def wait_disconnect_requested(self) -> None:
        """Wait until consumer code asks to end the call (transport, loop only)."""
        await self._disconnect_requested.wait()

    def request_clear_buffer(self) -> None:
        """Discard agent audio not yet heard (any thread).

        Drops audio and marks still queued locally (their waiters return as cleared) and
        asks the transport to send a ``clear`` for what the far end has buffered.
        """
        if self._loop is None:
            self.port.clear_local()
            return
        self._on_loop(self.port.clear_local)

    async def sleep_unless_cleared(self, seconds: float, *, early: float = 0.0) -> bool:
        """Delegate of ``port.sleep_unless_cleared()`` (loop only)."""
        return await self.port.sleep_unless_cleared(seconds, early=early)

    def nudge(self) -> None:
        """Delegate of ``port.nudge()`` (loop only)."""
        self.port.nudge()

    def note_clear_sent(self) -> None:
        """Record that the transport sent a clear (loop only)."""
        self.stats.clears_sent += 1

    # ------------------------------------------------------------------ DTMF and events

    def signal_dtmf(self, digit: str) -> None:
        """Deliver a DTMF digit from the caller (transport, loop only)."""
        self.stats.dtmf_digits += 1
        try:
            self._dtmf_queue.put_nowait(digit)
        except asyncio.QueueFull:
            self.stats.dtmf_dropped += 1
            if self._log_limit.allow("dtmf_dropped"):
                logger.warning(
                    "DTMF digit dropped: nobody reads the DTMF iterator",
                    extra={"call_sid": self.call_sid, "dropped": self.stats.dtmf_dropped},
                )
        if self.on_dtmf is not None:
            self._user_callback(self.on_dtmf, digit, what="on_dtmf")

    async def _next_dtmf(self) -> str | None:
        queue = self._dtmf_queue
        digit = await queue.get()
        if digit is None:  # leave the end for every other reader
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        return digit

    async def dtmf(self) -> AsyncIterator[str]:
        """Yield the caller's DTMF digits until the call ends (loop only)."""
        while (digit := await self._next_dtmf()) is not None:
            yield digit

    def iter_dtmf(self, timeout: float | None = None) -> Iterator[str]:
        """Yield the caller's DTMF digits from a worker thread until the call ends.

        Blocking. Stops early when no digit arrives within ``timeout`` seconds.
        """
        while True:
            try:
                digit = self._blocking("iter_dtmf", self._next_dtmf(), timeout, None, grace=0.0)
            except TimeoutError:
                return
            if digit is None:
                return
            yield digit

    def emit_event(self, event: SessionEvent) -> None:
        """Deliver a lifecycle event to ``on_event`` (any thread; off the loop thread, in order)."""
        if self.on_event is not None:
            self._user_callback(self.on_event, event, what="on_event")

    def _user_callback(self, fn: Callable[..., Any], *args: Any, what: str) -> None:
        """Run a user callback: on the loop thread it must not block the loop, so it goes to
        the session's callback lane (a worker thread, or a task if async, in order); from any
        other thread it runs inline, as 0.1.x callers of ``signal_disconnected`` expect."""
        loop = self._loop
        if loop is not None and running_loop() is loop:
            self.port.callbacks.fire(fn, *args, what=what)
            return
        try:
            result = fn(*args)
        except Exception:
            logger.exception("user callback failed", extra={"callback": what})
            return
        if asyncio.iscoroutine(result):
            if loop is not None and loop.is_running():
                asyncio.run_coroutine_threadsafe(result, loop)
            else:
                result.close()

    # ------------------------------------------------------------------ monitoring

    def set_mixer(self, m: Any) -> None:
        """Attach an AudioMixer that receives both call legs."""
        self._mixer = m

    def tap_caller(self, b: bytes) -> None:
        """Feed caller audio to the mixer, if one is set."""
        mixer = self._mixer
        if mixer is not None:
            mixer.write_caller(b)

    def tap_agent(self, b: bytes) -> None:
        """Feed agent audio to the mixer, if one is set."""
        mixer = self._mixer
        if mixer is not None:
            mixer.write_agent(b)
